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
from tests.train_utils import logged_steps, make_trainer

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


@pytest.mark.parametrize("window", [None, 6], ids=["causal", "sliding-window"])
def test_decoding_attends_over_cached_latents_and_gives_one_uncached_forwards_logits(window):
    """The cache keeps one [latent ; rotated key] per token and layer (16 + 4 numbers, not 4 heads x (12 + 12)), as
    keys and as values; decoding through it gives the logits of one uncached forward, and the layers attend as in
    training again after."""
    from plait.train.build import build_model
    from plait.train.decode import caches_in

    cfg = model_config(q_lora_rank=24, sliding_window=window)
    model = build_model(cfg, seed=7).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(tokens)
        with caches_in(model.layers.values(), window) as caches:
            steps = [model(tokens[:, :12])] + [model(tokens[:, i:i + 1]) for i in range(12, 20)]
        assert all(not block.attn.absorb for block in model.layers.values())
        assert torch.equal(model(tokens), whole)
    assert caches[0].keys.shape == (2, 1, 20, 16 + 4) and caches[0].values is caches[0].keys  # (kept once)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_speculative_decoding_with_latent_attention_gives_greedy_decodings_tokens():
    """Multi-token prediction's drafts over latent caches, with drafts rolled back (`KVCache.drop_last`)."""
    from plait.train.build import build_model
    from plait.train.decode import generate
    from plait.train.speculative import generate_with_mtp

    model = build_model(model_config(q_lora_rank=24, mtp_layers=1), seed=9).eval()
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, prompt, 40, temperature=0)
    tokens, counts = generate_with_mtp(model, prompt, 40)
    assert torch.equal(tokens, greedy) and counts["drafted"] > 0


# the trainer ----------------------------------------------------------------------------------
STEPS = 3
BASE = ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=256",
        "model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
        "model.qk_rope_head_dim=4", "model.v_head_dim=8", "train.seq_len=32", "train.batch_size=8",
        f"train.steps={STEPS}", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "train.progress=false", "train.peak_flops=1e10", "checkpoint.save_final=false", "parallel.microbatches=2"]


def train(rank, world, run_dir, cache, extra):
    """The losses and grad norms of STEPS steps and the validation loss after them; the weights go to a checkpoint."""
    return logged_steps(make_trainer(rank, world, BASE, extra, run_dir, cache), STEPS, save=True)


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
    (2, ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_overlap=false")),
    (2, ("parallel.cp=2",)),
    (2, ("parallel.cp=2", "parallel.cp_mode=ulysses")),
    (4, ("parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true")),
    (2, ("parallel.pp=2",)),
    (2, ("parallel.pp=2", "parallel.schedule=zbh1")),
    (2, ("parallel.zero=3",)),
], ids=["tp2", "tp2-sp", "tp2-sp-mapped", "cp2-ring", "cp2-ulysses", "tp2-cp2-sp", "pp2", "pp2-zbh1", "dp2-zero3"])
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


# muP -----------------------------------------------------------------------------------------------
def test_mup_classifies_every_latent_matrix_as_the_mup_package_does():
    """Widths 32 -> 128 (base heads of 8: four heads become sixteen): the latents' ranks grow with the width, so every
    latent-attention matrix is hidden (lr / width_mult) and its gains are vectors, as `mup.set_base_shapes` finds;
    the attention logits scale by attn_mult x sqrt(base qk size) / qk size (here equal: the head sizes stay)."""
    import dataclasses
    import math

    import mup

    from plait.optim.config import OptimConfig
    from plait.train.model import Transformer
    from plait.train.parametrization import build_parametrization, config_at_width

    cfg = model_config(dim=128, n_heads=16, q_lora_rank=64, kv_lora_rank=64, base_dim=32, base_head_dim=8,
                       n_layers=1)
    target = Transformer(cfg)
    base, delta = Transformer(config_at_width(cfg, 32, 8)), Transformer(config_at_width(cfg, 64, 8))
    mup.set_base_shapes(target, base, delta=delta)
    param = build_parametrization(cfg, OptimConfig(name="adamw", lr=1e-3, mup=True))
    latent = [name for name in param.table if ".attn." in name]
    assert len(latent) == 7  # wq_a, q_a_norm, wq_b, wkv_a, kv_a_norm, wkv_b, wo
    for name, p in target.named_parameters():
        width_mult = p.infshape.width_mult() if p.infshape.ninf() == 2 else 1.0
        if name in latent:
            assert param.table[name].role == ("hidden" if p.ndim == 2 else "vector"), name
            if p.ndim == 2:
                assert param.table[name].width_mult == pytest.approx(width_mult), name
    assert param.table["layers.0.attn.wkv_b.weight"].lr_mult == pytest.approx(0.25)
    assert dataclasses.asdict(config_at_width(cfg, 32, 8))["kv_lora_rank"] == 16
    assert param.scales.attention == pytest.approx(1 / math.sqrt(12))  # (mup_attn_mult 1, qk 8 + 4 at every width)


def test_coordinate_check_with_latent_attention(stdlib_tokens):
    """muP's criterion with latent attention in every block: every hidden layer at 4x the width within 1.2x at steps
    1-3; under the standard parametrization some grow more than 2x."""
    from plait.train.coord_check import coord_data, growth, worst_hidden

    settings = dict(steps=3, seeds=3, optim="lion", lr=2e-3, base_dim=64, attention="mla")
    mup_coords = coord_data([64, 256], True, str(stdlib_tokens[0]), **settings)
    sp_coords = coord_data([64, 256], False, str(stdlib_tokens[0]), **settings)
    assert worst_hidden(mup_coords) <= 1.2, growth(mup_coords)
    assert worst_hidden(sp_coords) > 2.0, growth(sp_coords)


def test_zero_query_zeroes_the_query_projection_whole():
    from plait.optim.config import OptimConfig
    from plait.train.model import Transformer
    from plait.train.parametrization import build_parametrization, init_model

    cfg = model_config(q_lora_rank=24)
    model = Transformer(cfg)
    init_model(model, 0, build_parametrization(cfg, OptimConfig(name="lion", mup=True, mup_zero_query=True)))
    attn = model.layers["0"].attn
    assert torch.count_nonzero(attn.wq_b.weight) == 0
    assert torch.count_nonzero(attn.wq_a.weight) == attn.wq_a.weight.numel()


# what MFU and `plait plan` count ------------------------------------------------------------------
@pytest.mark.parametrize("q_rank", [0, 24])
def test_flops_count_the_built_models_matmul_weights_and_its_head_sizes(q_rank):
    from dataclasses import replace

    from plait.train.build import build_model
    from plait.train.metrics import flops_per_token, matmul_params

    cfg = model_config(q_lora_rank=q_rank)
    model = build_model(cfg, seed=0)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name != "embed.weight")
    assert matmul_params(cfg) == matrices
    # per layer and token of context: scores over q.k (4 heads of 8 + 4), weighted values (4 heads of 6), x 2 x 3
    attention = flops_per_token(cfg, 64) - 6 * matrices
    assert attention == 6 * cfg.n_layers * 4 * (12 + 6) * 64
    assert flops_per_token(replace(cfg, v_head_dim=12), 64) - 6 * matmul_params(replace(cfg, v_head_dim=12)) == \
        6 * cfg.n_layers * 4 * (12 + 12) * 64


@pytest.mark.parametrize("extra", [[], ["model.q_lora_rank=64"], ["model.q_lora_rank=64", "model.v_head_dim=48"]],
                         ids=["one-query-projection", "query-latent", "values-unpadded"])
def test_the_plans_activations_match_a_real_forward(extra):
    """`plait plan`'s activation bytes (one micro-batch alive at pp=1) against what a real CPU forward saves."""
    from plait.train.config import load_config
    from plait.train.model import Transformer
    from plait.train.plan import plan
    from tests.memory_utils import saved_activation_bytes

    cfg = load_config(["model=tiny", "train.seq_len=64", "train.batch_size=8", "parallel.microbatches=2",
                       "model.attention=mla", *extra])
    model = Transformer(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 65))
    measured = saved_activation_bytes(model, lambda: model.loss(model(ids[:, :-1]), ids[:, 1:]))
    assert plan(cfg, 1).stages[0].activations == pytest.approx(measured, rel=0.01)


# bad settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,words", [
    (["model.attention=gqa"], "model.attention=gqa is not one of mha, mla"),
    (["model.kv_lora_rank=16"], "model.kv_lora_rank=16 sizes multi-head latent attention, but model.attention=mha"),
    (["model.attention=mla", "model.qk_norm=true"], "model.qk_norm=true is for model.attention=mha"),
    (["model.attention=mla", "model.n_kv_heads=2"], "model.n_kv_heads=2 groups key-value heads"),
    (["model.attention=mla", "model.qk_rope_head_dim=3"], "model.qk_rope_head_dim=3 must be even"),
    (["model.attention=mla", "model.kv_lora_rank=0"], "model.kv_lora_rank=0 must be >= 1"),
    (["model.attention=mla", "model.q_lora_rank=-1"], "model.q_lora_rank=-1 must be >= 0"),
    (["model.attention=mla", "model.kv_lora_rank=40", "train.precision=fp8"], "but model.kv_lora_rank is 40"),
])
def test_bad_settings_get_one_sentence(extra, words):
    from plait.train import load_config
    from plait.train.config import ConfigError, validate

    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as error:
        validate(load_config(["model.n_layers=4", *extra]), world_size=1)
    assert "\n" not in str(error.value)


# DeepSeek-V3's Hugging Face format -----------------------------------------------------------------
ROUTED = dict(moe_experts=4, moe_top_k=2, moe_score_function="sigmoid", moe_router_groups=2, moe_router_group_topk=1,
              moe_shared_ffn_dim=48, moe_shared_gate=False, moe_topk_scaling_factor=2.5, moe_bias_update_rate=1e-3)
YARN = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16, rope_mscale=0.707, rope_mscale_all_dim=1.0)
VARIANTS = {"dense": dict(), "query-latent-tied-mup": dict(q_lora_rank=24, tie_embeddings=True, base_dim=16),
            "experts": dict(q_lora_rank=24, **ROUTED), "yarn": dict(q_lora_rank=24, **YARN)}


def deepseek_model(variant: str):
    """A small latent-attention model, its gains, routing biases and weights away from their init (so a weight left
    out, misplaced or unscaled shows), and the parametrization it was built with."""
    from plait.optim.config import OptimConfig
    from plait.train.build import build_model
    from plait.train.parametrization import build_parametrization

    cfg = model_config(vocab_size=300, **VARIANTS[variant])
    parametrization = build_parametrization(cfg, OptimConfig(mup=cfg.base_dim is not None))
    model = build_model(cfg, seed=5, scales=parametrization.scales).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("expert_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
            elif tensor.dim() == 2 and not name.startswith("rope_"):
                tensor.mul_(5.0)  # (std 0.1: attention and routing move the logits)
    return cfg, model, parametrization


def save_and_export(cfg, model, scales, directory):
    """`model` (its routing biases too) saved as a one-process checkpoint under `directory` and exported to
    `directory`/hf; that directory."""
    from plait.parallel.grid import Grid
    from plait.parallel.plans import param_specs
    from plait.parallel.sharding import ShardSpec
    from plait.train.checkpoint import SaveRequest, layout_meta, model_meta, save
    from plait.train.export import export_checkpoint

    grid, biases = Grid.single(), dict(model.named_buffers())
    biases = {name: bias for name, bias in biases.items() if name.endswith("expert_bias")}
    specs = {**param_specs(model), **{name: ShardSpec(tuple(bias.shape), None) for name, bias in biases.items()}}
    request = SaveRequest(3, {**dict(model.named_parameters()), **biases}, specs,
                          meta={**layout_meta(grid), **model_meta(cfg, scales)})
    return export_checkpoint(save(directory / "ckpt", grid, request), directory / "hf")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_is_deepseek_v3_and_matches_transformers_and_loads_back(variant, tmp_path):
    import json

    import transformers

    from plait.train.build import build_model
    from plait.train.decode import generate
    from plait.train.export import init_from_hf, model_config_from_hf

    cfg, model, parametrization = deepseek_model(variant)
    directory = save_and_export(cfg, model, parametrization.scales, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True,
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[..., :300], hf(ids).logits
        assert ((ours - theirs).abs().max() / ours.abs().max()) < 1e-4  # (fp32; the rotary tables differ by 1e-6)
        prompt = ids[:, :4]
        hf_out = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
                             eos_token_id=None, attention_mask=torch.ones_like(prompt))
        assert torch.equal(generate(model, prompt, 20, temperature=0), hf_out)
    _, fresh, _ = deepseek_model(variant)
    learned = [(name, t) for name, t in [*fresh.named_parameters(), *fresh.named_buffers()] if "rope_" not in name]
    with torch.no_grad():
        for _, tensor in learned:
            tensor.zero_()
    init_from_hf(fresh, directory)  # the directory loads back, muP's folding undone, routing biases too
    expected = dict([*model.named_parameters(), *model.named_buffers()])
    assert any(name.endswith("expert_bias") for name, _ in learned) == (variant == "experts")
    for name, tensor in learned:
        assert torch.allclose(tensor, expected[name], rtol=1e-6, atol=0), name
    # what `plait generate` / `plait eval` do with a directory: the model config read from it, the weights loaded
    read = build_model(model_config_from_hf(json.loads((directory / "config.json").read_text())), seed=0).eval()
    init_from_hf(read, directory)
    with torch.no_grad():
        assert ((read(ids)[..., :300] - ours).abs().max() / ours.abs().max()) < 1e-5


def test_a_deepseek_directory_with_interleaved_rotary_features_loads_as_the_same_model(tmp_path):
    """transformers' default (and DeepSeek's own) layout pairs neighbouring rotary features; plait reorders the
    query and shared-key rows on the way in, and the model config read from the directory builds the model."""
    import json

    from transformers import DeepseekV3ForCausalLM

    from plait.train.build import build_model
    from plait.train.export import init_from_hf, model_config_from_hf

    hf_cfg = hf_config(model_config(vocab_size=300, q_lora_rank=24))
    hf_cfg.rope_interleave = True
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(torch.randn_like(param) * 0.1 if param.dim() == 2 else torch.rand_like(param) + 0.5)
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_interleave"] is True
    cfg = model_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    model = build_model(cfg, seed=0).eval()
    init_from_hf(model, tmp_path / "hf")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[..., :300], hf(ids).logits
    assert ((ours - theirs).abs().max() / ours.abs().max()) < 1e-4
    hf_cfg.rope_interleave = False  # the same weights read as halves are another model: the reordering matters
    halves = DeepseekV3ForCausalLM(hf_cfg).eval()
    halves.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (halves(ids).logits - ours).abs().max() / ours.abs().max() > 1e-2


@pytest.mark.parametrize("change,words", [
    (dict(moe_score_function="softmax"), "DeepSeek-V3 scores experts with a sigmoid but model.moe_score_function="
                                          "softmax"),
    (dict(moe_shared_gate=True), "DeepSeek-V3's shared experts are ungated"),
    (dict(sliding_window=8), "model.sliding_window=8 has no place in DeepSeek-V3's config"),
])
def test_an_export_deepseek_v3_cannot_hold_is_refused_in_one_sentence(change, words):
    import dataclasses

    from plait.train.export import model_type

    cfg = model_config(**{**ROUTED, **change})
    with pytest.raises(Exception, match=words.replace("(", r"\(").replace(")", r"\)")):
        model_type(dataclasses.asdict(cfg))


def test_directories_and_models_of_the_other_attention_refuse_each_other(tmp_path):
    """A DeepSeek-V3 directory into a multi-head model, a Llama directory into a latent one, and a DeepSeek-V3
    directory whose first layers alone are dense: each refused in one sentence naming the setting."""
    import json

    from plait.train.build import build_model
    from plait.train.config import ModelConfig
    from plait.train.export import init_from_hf
    from plait.train.model import Scales

    cfg, model, parametrization = deepseek_model("dense")
    save_and_export(cfg, model, parametrization.scales, tmp_path)
    mha_cfg = ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=64)
    mha = build_model(mha_cfg)
    with pytest.raises(Exception, match="is model_type=deepseek_v3, whose attention is latent, but "
                                        "model.attention=mha; set model.attention=mla"):
        init_from_hf(mha, tmp_path / "hf")
    llama = save_and_export(mha_cfg, mha, Scales(), tmp_path / "llama")
    with pytest.raises(Exception, match="is model_type=llama, whose attention is multi-head, but "
                                        "model.attention=mla; set model.attention=mha"):
        init_from_hf(model, llama)
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(first_k_dense_replace=1, n_routed_experts=4)
    config_file.write_text(json.dumps(config))
    with pytest.raises(Exception, match="first_k_dense_replace=1 of 2 layers dense"):
        init_from_hf(model, tmp_path / "hf")


@pytest.mark.parametrize("backend", ["host", "recompute"])
def test_offloaded_or_recomputed_latent_attention_trains_as_kept(backend, tmp_path, stdlib_tokens):
    """Every tensor latent attention saves (the latents, the padded values, the shared rotary key) goes to host
    memory and back, or is recomputed: the same losses and grad norms, bit for bit, as keeping them."""
    cache = stdlib_tokens[0].parent.parent
    kept, _ = logged_steps(make_trainer(0, 1, BASE, [], tmp_path / "kept", cache), 2)
    moved = make_trainer(0, 1, BASE, [f"offload={backend}", "offload.keep_last=0", "offload.min_bytes=0",
                                      "offload.device_filter=all"], tmp_path / backend, cache)
    got, _ = logged_steps(moved, 2, ("loss", "grad_norm", "offload_written_bytes"))
    assert got["loss"] == kept["loss"] and got["grad_norm"] == kept["grad_norm"]
    if backend == "host":
        assert min(got["offload_written_bytes"]) > 0


def test_float8_runs_the_heads_layers_and_leaves_the_down_projections():
    """`train.precision=fp8`: each block's query (or query up-) projection, key-value up-projection and output run
    float8 GEMMs beside the MLP's two; the down projections are plain linears."""
    from plait.parallel.float8 import use_float8
    from plait.parallel.grid import Grid
    from plait.train.build import build_model

    for q_rank in (0, 24):
        model = build_model(model_config(q_lora_rank=q_rank), seed=0)
        assert use_float8(model, Grid.single()) == 2 * (3 + 2)
        attn = model.layers["0"].attn
        assert type(attn.wkv_a).__name__ == "Linear" and hasattr(attn.wkv_b, "use_gemm")
