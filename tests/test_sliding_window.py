"""`model.sliding_window=W`: each token attends to itself and the W - 1 before it (Mistral's window).

Held to: the mask's booleans; a one-layer model, whose last token then sees exactly the last W
tokens, against the same model run on those W alone; transformers' `MistralForCausalLM` on the
exported weights (logits, and greedy decoding through both caches); cached decoding against the
full forward; every layout against one process, with the window and documents together.
"""

import pytest
import torch

from dist_utils import run_ranks
from train_utils import train_steps
from plait.train.attention_mask import AttentionMask
from plait.train.build import build_model
from plait.train.config import ConfigError, ModelConfig, load_config, validate
from plait.train.decode import attach_caches, generate
from plait.train.model import Scales


def test_the_mask_sees_the_window_and_the_document():
    documents = torch.tensor([[0, 0, 0, 1, 1, 1]])
    dense = AttentionMask(documents, window=2).dense(6, "cpu")[0, 0].int().tolist()
    assert dense == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0],
                     [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert AttentionMask(window=3).dense(4, "cpu").shape == (1, 1, 4, 4)
    assert AttentionMask.of(None, None) is None


@torch.no_grad()
def test_one_layer_sees_exactly_the_last_w_tokens():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=64, sliding_window=5)
    model = build_model(cfg, seed=2, scales=Scales(2.0, 0.5, 1.0 / 16)).eval()
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    for i in (4, 11, 19):
        alone = model(ids[:, i - 4:i + 1])[:, -1]  # the same 5 tokens, first in their own sequence
        assert torch.allclose(out[:, i], alone, atol=1e-5), i
    scales = Scales(2.0, 0.5, 1.0 / 16)
    wide = build_model(ModelConfig(**{**cfg.__dict__, "sliding_window": 20}), seed=2, scales=scales)
    plain = build_model(ModelConfig(**{**cfg.__dict__, "sliding_window": None}), seed=2, scales=scales)
    assert torch.allclose(wide.eval()(ids), plain.eval()(ids), atol=1e-6)  # a window as long as the sequence
    assert (plain(ids) - out).abs().max() > 0.05


def mistral_model(window=6):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, max_seq_len=64,
                      sliding_window=window)
    model = build_model(cfg, seed=5).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return cfg, model


def test_export_is_mistral_with_its_window_and_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from plait.parallel.grid import Grid
    from plait.parallel.plans import param_specs
    from plait.train.checkpoint import SaveRequest, layout_meta, model_meta, save
    from plait.train.export import export_checkpoint, init_from_hf

    cfg, model = mistral_model()
    grid = Grid.single()
    request = SaveRequest(3, dict(model.named_parameters()), param_specs(model),
                          meta={**layout_meta(grid), **model_meta(cfg)})
    export_checkpoint(save(tmp_path / "ckpt", grid, request), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == 6
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[..., :300], hf(ids).logits
        assert ((ours - theirs).abs().max() / ours.abs().max()) < 1e-5
        prompt = ids[:, :4]  # greedy through both caches, far past the window
        mine = generate(model, prompt, 30, temperature=0)
        hf_out = hf.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                             eos_token_id=None, attention_mask=torch.ones_like(prompt))
    assert torch.equal(mine, hf_out)
    _, fresh = mistral_model()
    init_from_hf(fresh, tmp_path / "hf")  # a Mistral directory loads into a model with the same window
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    _, other = mistral_model(window=8)
    with pytest.raises(Exception, match=r"has sliding_window=6 but model.sliding_window=8; set "
                                        r"model.sliding_window=6 to load it"):
        init_from_hf(other, tmp_path / "hf")


@torch.no_grad()
def test_cached_decoding_under_a_window_gives_the_full_forwards_logits():
    _, model = mistral_model(window=4)
    ids = torch.randint(0, 300, (2, 15), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    attach_caches(model)
    pieces = [model(ids[:, :6]), model(ids[:, 6:9])] + [model(ids[:, i:i + 1]) for i in range(9, 15)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


STEPS = 5
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=128", "train.seq_len=32",
        "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10", "optim.warmup_steps=2",
        "optim.lr=1e-3", "train.eval_every=0", "checkpoint.save_final=false", "model.sliding_window=7",
        "model.attn_mask=document", "data.eos_id=10"]


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "parallel.microbatches=2"],
    ["parallel.cp=2", "parallel.cp_mode=ulysses", "parallel.zero=1"],
], ids=["tp2-sp-pp2", "cp2-ulysses-dp2-zero1"])
def test_layouts_match_one_process_under_a_window_and_documents(overrides, tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    reference = train_steps(0, 1, BASE, [], tmp_path / "one", cache, STEPS)
    plain = train_steps(0, 1, BASE, ["model.sliding_window=null"], tmp_path / "plain", cache, STEPS, 0)
    assert abs(plain[0][0] - reference[0][0]) > 1e-4  # the window changes the loss
    for losses, norms, val in run_ranks(4, train_steps, BASE, overrides, tmp_path / "many", cache, STEPS):
        assert losses == pytest.approx(reference[0], rel=1e-5)
        assert norms == pytest.approx(reference[1], rel=1e-5)
        assert val == pytest.approx(reference[2], rel=1e-5)


def test_a_window_with_ring_attention_or_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"^model.sliding_window=7 with parallel.cp=2 needs parallel.cp_mode=ulysses"):
        validate(load_config(BASE[:-2] + ["parallel.cp=2"]), world_size=2)
    with pytest.raises(ConfigError, match="model.sliding_window=0"):
        validate(load_config(["model.sliding_window=0"]))
