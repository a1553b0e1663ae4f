"""The Qwen families' attention: `model.qk_norm` (each head's query and key RMS-normed over its features before
rotary: OLMo 2, Qwen3) and `model.qkv_bias` (biases on the query, key and value projections: Qwen2).

Held to: transformers' `Qwen3ForCausalLM` / `Qwen2ForCausalLM` on the exported weights (logits, greedy
decoding through both caches, muP's attention scale folded into q_norm's gain or into q_proj and its bias),
and the export loading back; every layout against one process (tp splits the heads, so QK-norm's shared
gains' grads are summed over tp: without that sum the tp test fails; the biases split by segment); a
Llama directory refused for such a model in one sentence.
"""

import pytest
import torch

from dist_utils import run_ranks
from train_utils import train_steps
from plait.optim.config import OptimConfig
from plait.train.build import build_model
from plait.train.config import ModelConfig
from plait.train.decode import generate


FAMILIES = {"qk_norm": "Qwen3ForCausalLM", "qkv_bias": "Qwen2ForCausalLM"}


def qk_model(mup: bool = False, feature: str = "qk_norm"):
    """A small QK-norm (or q/k/v-bias) model with gains away from 1 and biases away from 0 (so a gain or bias left
    out or misplaced shows)."""
    from plait.train.parametrization import build_parametrization, init_model

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, max_seq_len=64,
                      base_dim=32 if mup else None, **{feature: True})
    parametrization = build_parametrization(cfg, OptimConfig(mup=mup))
    model = build_model(cfg, seed=5, scales=parametrization.scales).eval()
    init_model(model, 5, parametrization)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return cfg, model, parametrization


@pytest.mark.parametrize("feature", list(FAMILIES))
@pytest.mark.parametrize("mup", [False, True], ids=["standard", "mup"])
def test_export_is_qwen_and_matches_transformers(mup, feature, tmp_path):
    transformers = pytest.importorskip("transformers")
    from plait.parallel.grid import Grid
    from plait.parallel.plans import param_specs
    from plait.train.checkpoint import SaveRequest, layout_meta, model_meta, save
    from plait.train.export import export_checkpoint, init_from_hf

    cfg, model, parametrization = qk_model(mup, feature)
    grid = Grid.single()
    request = SaveRequest(3, dict(model.named_parameters()), param_specs(model),
                          meta={**layout_meta(grid), **model_meta(cfg, parametrization.scales)})
    export_checkpoint(save(tmp_path / "ckpt", grid, request), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == FAMILIES[feature]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[..., :300], hf(ids).logits
        assert ((ours - theirs).abs().max() / ours.abs().max()) < 1e-5
        prompt = ids[:, :4]
        mine = generate(model, prompt, 20, temperature=0)
        hf_out = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
                             eos_token_id=None, attention_mask=torch.ones_like(prompt))
    assert torch.equal(mine, hf_out)
    _, fresh, _ = qk_model(mup, feature)
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    init_from_hf(fresh, tmp_path / "hf")  # the Qwen directory loads back, the folding undone
    for (name, a), b in zip(fresh.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=0), name


@pytest.mark.parametrize("feature,what", [("qk_norm", "QK-norm"), ("qkv_bias", "q, k and v biases")])
def test_a_llama_directory_is_refused_for_a_qwen_model(feature, what, tmp_path):
    from plait.train.export import export_checkpoint, init_from_hf
    from plait.parallel.grid import Grid
    from plait.parallel.plans import param_specs
    from plait.train.checkpoint import SaveRequest, layout_meta, model_meta, save

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, max_seq_len=64)
    model = build_model(cfg, seed=5)
    grid = Grid.single()
    request = SaveRequest(1, dict(model.named_parameters()), param_specs(model),
                          meta={**layout_meta(grid), **model_meta(cfg)})
    export_checkpoint(save(tmp_path / "ckpt", grid, request), tmp_path / "llama")
    _, qwen, _ = qk_model(feature=feature)
    with pytest.raises(Exception, match=rf"is model_type=llama, without {what}, but model.{feature}=True; set "
                                        rf"model.{feature}=False to load it"):
        init_from_hf(qwen, tmp_path / "llama")


STEPS = 4
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96",
        "train.seq_len=32", "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10",
        "optim.warmup_steps=1", "optim.lr=3e-3", "train.eval_every=0", "checkpoint.save_final=false",
        "model.qk_norm=true", "model.qkv_bias=true"]


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "parallel.microbatches=2"],
    ["parallel.tp=2", "parallel.cp=2"],
], ids=["tp2-sp-pp2", "tp2-cp2-ring"])
def test_layouts_match_one_process_with_qk_norm_and_qkv_bias(overrides, tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    reference = train_steps(0, 1, BASE, [], tmp_path / "one", cache, STEPS)
    plain = train_steps(0, 1, BASE, ["model.qk_norm=false", "model.qkv_bias=false"], tmp_path / "plain", cache,
                        STEPS, 0)
    assert abs(plain[0][-1] - reference[0][-1]) > 1e-4  # the norms and biases change training
    for losses, norms, val in run_ranks(4, train_steps, BASE, overrides, tmp_path / "many", cache, STEPS):
        assert losses == pytest.approx(reference[0], rel=1e-5)
        assert norms == pytest.approx(reference[1], rel=1e-5)
        assert val == pytest.approx(reference[2], rel=1e-5)
