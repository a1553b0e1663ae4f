"""Multi-head latent attention (train/mla.py, `model.attention=mla`): what it holds and how it is checked.

- One attention layer, with and without the query latent, equals Hugging Face's `DeepseekV3Attention` given the same
  weights; a whole dense decoder equals `DeepseekV3ForCausalLM` (its layers all dense), logits and loss.
- Decoding with the cache gives the logits of one uncached forward over the whole text.
- The trainer under tp2 (with and without SP, with tp_overlap), cp2 (ring, Ulysses), tp2 x cp2 with SP, pipelines
  (1F1B, ZB-H1) and dp2 with ZeRO-3: its losses, grad norms and validation loss equal one process's.
- MFU's FLOPs count the built model's matmul weights and the attention of its head sizes; `plait plan`'s
  activation bytes and its tp traffic match a real forward and the model's shapes.
- Bad settings get one sentence.
"""

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.train_utils import make_trainer

# HF's names of plait's latent attention weights
HF_NAMES = {"wq": "q_proj", "wq_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "wq_b": "q_b_proj",
            "wkv_a": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}


def model_config(**extra):
    from plait.train.config import ModelConfig

    sizes = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=6, max_seq_len=64, ffn_dim=48)
    return ModelConfig(**{**sizes, **extra})


def hf_config(cfg):
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                          num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                          num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
                          kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                          qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, rope_interleave=False,
                          max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, attention_bias=False,
                          first_k_dense_replace=cfg.n_layers, tie_word_embeddings=False)
    hf._attn_implementation = "eager"
    return hf


@torch.no_grad()
def copy_attention(mine, hf, generator):
    """Fresh random weights (matrices N(0, 0.3), gains in [0.5, 1.5]) into HF's attention, the same into plait's."""
    for name, hf_name in HF_NAMES.items():
        if getattr(mine, name) is None:
            continue
        weight = getattr(hf, hf_name).weight
        fresh = torch.randn(weight.shape, generator=generator) * 0.3 if weight.dim() == 2 else \
            torch.rand(weight.shape, generator=generator) + 0.5
        weight.copy_(fresh)
        getattr(mine, name).weight.copy_(fresh)


@pytest.mark.parametrize("q_rank", [0, 24], ids=["one-query-projection", "query-latent"])
def test_one_layer_equals_hugging_faces_deepseek_v3_attention(q_rank):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from plait.train.mla import LatentAttention
    from plait.train.model import Scales, Transformer

    cfg = model_config(q_lora_rank=q_rank)
    hf_cfg = hf_config(cfg)
    hf, mine = DeepseekV3Attention(hf_cfg, 0), LatentAttention(cfg, Scales())
    copy_attention(mine, hf, torch.Generator().manual_seed(q_rank))
    x = torch.randn(2, 10, cfg.dim, generator=torch.Generator().manual_seed(1))
    cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, torch.arange(10)[None])
    expected = hf(x, (cos, sin), torch.full((10, 10), float("-inf")).triu(1)[None, None])[0]
    tables = Transformer(model_config(n_layers=1))
    got = mine(x, tables.rope_cos, tables.rope_sin)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # (outputs of size 1 to 5, fp32)
    assert mine.v_pad == 6  # (values padded from 6 to the query-key size 12 for the kernel, cut after)


def test_a_dense_decoder_equals_hugging_faces_deepseek_v3_for_causal_lm():
    from transformers import DeepseekV3ForCausalLM

    from plait.train.build import build_model

    cfg = model_config(q_lora_rank=24)
    model = build_model(cfg, seed=5)
    hf = DeepseekV3ForCausalLM(hf_config(cfg)).eval()
    hf_names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "head.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        block, hf_block = f"layers.{i}.", f"model.layers.{i}."
        hf_names.update({block + "attn_norm.weight": hf_block + "input_layernorm.weight",
                         block + "mlp_norm.weight": hf_block + "post_attention_layernorm.weight",
                         block + "mlp.w2.weight": hf_block + "mlp.down_proj.weight"})
        hf_names.update({f"{block}attn.{name}.weight": f"{hf_block}self_attn.{hf_name}.weight"
                         for name, hf_name in HF_NAMES.items() if name != "wq"})
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.mul_(10.0 if param.dim() == 2 else 1.0)  # (std 0.2: attention moves the logits by O(1))
            if name.endswith("mlp.w13.weight"):  # gate | up
                gate, up = param.detach().split(cfg.ffn_dim)
                prefix = "model." + name[:-len("w13.weight")]
                hf_params[prefix + "gate_proj.weight"].copy_(gate)
                hf_params[prefix + "up_proj.weight"].copy_(up)
            else:
                hf_params[hf_names[name]].copy_(param[:cfg.vocab_size] if "embed" in name or "head" in name else param)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    expected = hf(tokens[:, :-1]).logits
    torch.testing.assert_close(model(tokens[:, :-1])[..., :cfg.vocab_size], expected, rtol=1e-4, atol=1e-4)
    hf_loss = torch.nn.functional.cross_entropy(expected.flatten(0, 1), tokens[:, 1:].flatten())
    assert model.loss(model(tokens[:, :-1]), tokens[:, 1:]).item() == pytest.approx(hf_loss.item(), rel=1e-5)


def test_decoding_with_the_cache_gives_one_uncached_forwards_logits():
    from plait.train.build import build_model
    from plait.train.decode import caches_in

    cfg = model_config(q_lora_rank=24)
    model = build_model(cfg, seed=7).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(tokens)
        with caches_in(model.layers.values(), None):
            steps = [model(tokens[:, :12])] + [model(tokens[:, i:i + 1]) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


# the trainer ----------------------------------------------------------------------------------
STEPS = 3
BASE = ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=256",
        "model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
        "model.qk_rope_head_dim=4", "model.v_head_dim=8", "train.seq_len=32", "train.batch_size=8",
        f"train.steps={STEPS}", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "train.progress=false", "train.peak_flops=1e10", "checkpoint.save_final=false", "parallel.microbatches=2"]


def train(rank, world, run_dir, cache, extra):
    """The losses and grad norms of STEPS steps and the validation loss after them; the weights go to a checkpoint."""
    trainer = make_trainer(rank, world, BASE, extra, run_dir, cache)
    try:
        records = [trainer.step() for _ in range(STEPS)]
        trainer.save_checkpoint()
        return {key: [r.get(key) for r in records] for key in ("loss", "grad_norm")}, trainer.evaluate()
    finally:
        trainer.close()


def final_weights(run_dir):
    """Every weight of a run's last checkpoint, whole, whatever the layout that wrote it."""
    from plait.train.checkpoint import latest_checkpoint
    from plait.train.reshard import load_full_model

    return load_full_model(latest_checkpoint(run_dir / "checkpoints"))[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    cache, run_dir = str(stdlib_tokens[0].parent.parent), tmp_path_factory.mktemp("mla1")
    return train(0, 1, str(run_dir), cache, []), final_weights(run_dir), cache


@pytest.mark.parametrize("world,extra", [
    (2, ("parallel.tp=2",)),
    (2, ("parallel.tp=2", "parallel.sequence_parallel=true")),
    (2, ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_overlap=true")),
    (2, ("parallel.cp=2",)),
    (2, ("parallel.cp=2", "parallel.cp_mode=ulysses")),
    (4, ("parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true")),
    (2, ("parallel.pp=2",)),
    (2, ("parallel.pp=2", "parallel.schedule=zbh1")),
    (2, ("parallel.zero=3",)),
], ids=["tp2", "tp2-sp", "tp2-sp-overlap", "cp2-ring", "cp2-ulysses", "tp2-cp2-sp", "pp2", "pp2-zbh1", "dp2-zero3"])
def test_trainer_layouts_equal_one_process(tmp_path, reference, world, extra):
    """Losses, grad norms, validation, and every weight after the steps (the latents' down projections, whole on
    each tp rank, are among them: a grad left partial over tp moves them off by the learning rate)."""
    (expected, val), weights, cache = reference
    for got, got_val in run_ranks(world, train, str(tmp_path / "run"), cache, list(extra)):
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
        assert got_val == pytest.approx(val, rel=1e-5)
    got_weights = final_weights(tmp_path / "run")
    assert got_weights.keys() == weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(got_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert expected["loss"][-1] < expected["loss"][0]
