"""A Hugging Face Llama directory loads into plait only when plait computes what it computes.

For each config key plait honours (rope_theta, rms_norm_eps, Llama 3.1's rope scaling), a
directory with that key moved from its default loads into a plait model set the same way, and the
logits equal HF's to
1e-5; with the model config left at the default, the load is refused naming the key. For each
key plait does not implement (another rope scaling, biases, another activation, a head size that is
not width / heads), the load is refused in one line naming it.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from plait.train.build import build_model  # noqa: E402
from plait.train.checkpoint import CheckpointError  # noqa: E402
from plait.train.config import ModelConfig  # noqa: E402
from plait.train.export import init_from_hf  # noqa: E402

VOCAB, DIM, HEADS, KV, FFN, LAYERS = 300, 64, 4, 2, 96, 2


def hf_directory(tmp_path, **changes):
    settings = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64, rms_norm_eps=1e-5,
                    rope_theta=10000.0, tie_word_embeddings=False)
    config = transformers.LlamaConfig(**{**settings, **changes})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # norms too: a load that skipped one would show
            param.add_(torch.randn_like(param) * 0.05)
    directory = tmp_path / "hf"
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def plait_model(**changes):
    cfg = ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV, ffn_dim=FFN,
                      max_seq_len=64, **changes)
    return build_model(cfg, seed=1)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # (32 < the test's 64 positions: some frequencies blend)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0,
        "beta_slow": 2.0}  # (YaRN's magnitude correction too: cos and sin x 1.139)
HONOURED = [({"rope_theta": 500000.0}, {"rope_theta": 500000.0}, "rope_theta"),
            ({"rms_norm_eps": 1e-6}, {"norm_eps": 1e-6}, "rms_norm_eps"),
            ({"rope_scaling": LLAMA3}, {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 32},
             "rope_scaling"),
            ({"rope_scaling": YARN}, {"rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_len": 16,
                                      "rope_beta_fast": 16.0, "rope_beta_slow": 2.0}, "rope_scaling")]


@pytest.mark.parametrize("hf_change,plait_change,key", HONOURED,
                         ids=[h[2] + ("-yarn" if h[0] is not None and "yarn" in str(h[0]) else "") for h in HONOURED])
def test_honoured_keys_give_hf_logits_and_a_mismatch_is_refused(tmp_path, hf_change, plait_change, key):
    hf, directory = hf_directory(tmp_path, **hf_change)
    ours = plait_model(**plait_change)
    init_from_hf(ours, directory)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, reference = ours(ids)[..., :VOCAB], hf(ids).logits
    assert ((logits - reference).abs().max() / reference.abs().max()).item() < 1e-5
    with pytest.raises(CheckpointError, match=rf"has {key}=.* but model\.\w+=.*; set model\.\w+=") as info:
        init_from_hf(plait_model(), directory)
    assert "\n" not in str(info.value)


REFUSED = [({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling type linear"),
           ({"rope_scaling": {**YARN, "attention_factor": 2.0}}, "rope_scaling yarn with attention_factor=2.0"),
           ({"hidden_act": "gelu"}, "hidden_act=gelu"),
           ({"attention_bias": True}, "attention_bias=true"),
           ({"mlp_bias": True}, "mlp_bias=true"),
           ({"head_dim": 32}, "head_dim=32 is not hidden_size / num_attention_heads = 16")]


@pytest.mark.parametrize("hf_change,words", REFUSED, ids=[r[1].split("=")[0].split(" ")[0] for r in REFUSED])
def test_what_plait_does_not_compute_is_refused_in_one_line(tmp_path, hf_change, words):
    _, directory = hf_directory(tmp_path, **hf_change)
    with pytest.raises(CheckpointError) as info:
        init_from_hf(plait_model(), directory)
    assert words in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_llama3_scaled_model_exports_as_transformers_computes_it(tmp_path):
    """`model.rope_scaling=llama3` goes out as Hugging Face's rope_type llama3 with its numbers: transformers
    gives plait's logits, and the frequencies equal transformers' own bit for bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from plait.parallel.grid import Grid
    from plait.parallel.plans import param_specs
    from plait.train.checkpoint import SaveRequest, layout_meta, model_meta, save
    from plait.train.export import export_checkpoint
    from plait.train.rope import llama3_frequencies, plain_frequencies

    ours = plait_model(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=32, rope_theta=500000.0)
    grid = Grid.single()
    request = SaveRequest(1, dict(ours.named_parameters()), param_specs(ours),
                          meta={**layout_meta(grid), **model_meta(ours.cfg)})
    export_checkpoint(save(tmp_path / "ckpt", grid, request), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                           dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3" and hf.config.rope_parameters["factor"] == 8.0
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    assert torch.equal(llama3_frequencies(plain_frequencies(DIM // HEADS, 500000.0), ours.cfg), theirs.float())
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, reference = ours(ids)[..., :VOCAB], hf(ids).logits
    assert ((logits - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_yarn_frequencies_and_magnitude_equal_transformers_and_bad_numbers_are_refused():
    """YaRN's frequencies equal transformers' bit for bit, with its magnitude correction (the factor's alone, or
    DeepSeek's ratio of two); numbers YaRN cannot use are refused in one sentence naming the setting."""
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    from plait.train.config import ConfigError, load_config, validate
    from plait.train.rope import plain_frequencies, rotary_magnitude, yarn_frequencies

    for mscale, all_dim in ((0.0, 0.0), (0.707, 1.0), (1.0, 1.0)):
        cfg = ModelConfig(dim=256, n_heads=4, max_seq_len=512, rope_scaling="yarn", rope_factor=40.0,
                          rope_original_max_len=128, rope_mscale=mscale, rope_mscale_all_dim=all_dim)
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 128,
                **({"mscale": mscale, "mscale_all_dim": all_dim} if mscale else {})}
        frequencies, magnitude = _compute_yarn_parameters(transformers.LlamaConfig(
            hidden_size=256, num_attention_heads=4, max_position_embeddings=5120, rope_parameters=rope))
        assert torch.equal(yarn_frequencies(plain_frequencies(64, 10000.0), cfg), frequencies)
        assert rotary_magnitude(cfg) == pytest.approx(magnitude, rel=1e-12)
    for extra, words in ((["model.rope_beta_fast=1", "model.rope_beta_slow=2"],
                          "model.rope_beta_fast=1.0 must exceed model.rope_beta_slow=2.0"),
                         (["model.rope_mscale=-1"], "model.rope_mscale=-1.0 must be >= 0; 0 leaves it out")):
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as info:
            validate(load_config(["model.rope_scaling=yarn", *extra]))
        assert "\n" not in str(info.value)
