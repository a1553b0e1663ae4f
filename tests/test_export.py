"""`plait export` writes a Hugging Face Llama directory that transformers loads offline and that
gives plait's logits; importing it back gives the same weights.

Two models: grouped-query attention with an untied head and a padded vocabulary (300
tokens, 320 rows), and a tied one with muP multipliers (embedding 2, logits 0.5, attention
scale 1/head_dim) that export must fold into the weights. Norm gains are randomized so a
wrong name mapping cannot hide behind ones.
"""

import math

import pytest
import torch

from plait.parallel.grid import Grid
from plait.parallel.plans import param_specs
from plait.train.checkpoint import CheckpointError, SaveRequest, layout_meta, model_meta, save
from plait.train.reshard import load_full_model
from plait.train.config import load_config
from plait.train.export import HF_CONFIG, HF_WEIGHTS, init_from_hf
from plait.train.build import build_model
from plait.train.model import Scales
from plait.train.tools import main as tools_main

transformers = pytest.importorskip("transformers")

VOCAB = 300


def make_model(tie: bool, scales: Scales, seed: int = 7):
    cfg = load_config(["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                       "model.ffn_dim=96", f"model.vocab_size={VOCAB}", "model.rope_theta=5000",
                       "model.norm_eps=1e-6", f"model.tie_embeddings={str(tie).lower()}"]).model
    model = build_model(cfg, seed=seed, scales=scales)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return cfg, model.eval()


def save_model(root, cfg, model, scales):
    grid = Grid.single()
    request = SaveRequest(5, dict(model.named_parameters()), param_specs(model),
                          meta={**layout_meta(grid), **model_meta(cfg, scales)})
    return save(root, grid, request)


def export(checkpoint, out):
    with pytest.raises(SystemExit) as exited:
        tools_main(["export", str(checkpoint), str(out)])
    assert exited.value.code == 0
    assert (out / HF_CONFIG).is_file() and (out / HF_WEIGHTS).is_file()


@pytest.mark.parametrize("tie, scales", [(False, Scales()), (True, Scales(2.0, 0.5, 1.0 / 16))],
                         ids=["gqa-untied", "tied-mup"])
def test_export_matches_transformers_and_round_trips(tmp_path, tie, scales):
    cfg, model = make_model(tie, scales)
    checkpoint = save_model(tmp_path / "ckpt", cfg, model, scales)
    export(checkpoint, tmp_path / "hf")

    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                       dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tie and hf.config.num_key_value_heads == 2
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)[..., :VOCAB]
        theirs = hf(ids).logits
    relative = ((ours - theirs).abs().max() / ours.abs().max()).item()
    assert relative < 1e-5, relative
    assert ours.std() > 0.05  # logits that depend on the weights, not near-constant ones

    _, fresh = make_model(tie, scales, seed=99)
    init_from_hf(fresh, tmp_path / "hf")
    _, saved = load_full_model(checkpoint)
    for name, param in fresh.named_parameters():
        rows = saved[name].shape[0]  # the folded multipliers are powers of two, so folding back is exact
        assert torch.equal(param[:rows], saved[name]), name
        assert not param[rows:].any(), name  # vocabulary padding rows stay zero


def test_export_and_import_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        tools_main(["export", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exited.value.code == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err

    cfg, model = make_model(False, Scales())
    export(save_model(tmp_path / "ckpt", cfg, model, Scales()), tmp_path / "hf")
    save_model(tmp_path / "run" / "checkpoints", cfg, model, Scales())
    export(tmp_path / "run", tmp_path / "hf-from-run")  # a run directory, as plait generate and plait eval take
    assert (tmp_path / "hf-from-run" / HF_WEIGHTS).read_bytes() == (tmp_path / "hf" / HF_WEIGHTS).read_bytes()
    wider = build_model(load_config(["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
                                     f"model.vocab_size={VOCAB}"]).model, seed=1)
    with pytest.raises(CheckpointError, match=r"model.ffn_dim=128 vs 96.*model.n_kv_heads=4 vs 2"):
        init_from_hf(wider, tmp_path / "hf")
    (tmp_path / "hf" / HF_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'hf' / HF_WEIGHTS} is missing"):
        init_from_hf(wider, tmp_path / "hf")
    assert math.isfinite(float(model(torch.zeros(1, 4, dtype=torch.long)).sum()))


def test_export_writes_the_recorded_bpe_tokenizer_for_autotokenizer(tmp_path):
    """A checkpoint whose index records a tokenizer.json exports it: AutoTokenizer encodes as plait's tokenizer
    does, and config.json carries its end-of-text id; a byte-level one gets eos_token_id 0 and no file."""
    import json

    from plait.data.tokenizer import BPETokenizer
    from plait.train.export import export_checkpoint

    texts = [f"def function_{i}(value):\n    return value * {i}  # café\n" for i in range(200)]
    tokenizer = BPETokenizer.train(texts, VOCAB)
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_json())
    cfg, model = make_model(False, Scales())
    grid = Grid.single()
    for spec, name in ((str(tmp_path / "tokenizer.json"), "bpe"), ("byte", "byte")):
        request = SaveRequest(5, dict(model.named_parameters()), param_specs(model),
                              meta={**layout_meta(grid), **model_meta(cfg, Scales()), "tokenizer": spec})
        export_checkpoint(save(tmp_path / f"ckpt-{name}", grid, request), tmp_path / f"hf-{name}")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf-bpe"), local_files_only=True)
    sample = "def function_7(value):\n    return value * 7  # café\n"
    assert hf_tokenizer(sample)["input_ids"] == tokenizer.encode(sample).tolist()
    assert hf_tokenizer.decode(tokenizer.encode(sample).tolist()) == sample
    assert hf_tokenizer.eos_token_id == tokenizer.eos == json.loads((tmp_path / "hf-bpe" / HF_CONFIG).read_text())[
        "eos_token_id"]
    assert json.loads((tmp_path / "hf-byte" / HF_CONFIG).read_text())["eos_token_id"] == 0
    assert not (tmp_path / "hf-byte" / "tokenizer.json").exists()
