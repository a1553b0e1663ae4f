"""The composed config: one dataclass per group, registered with Hydra's ConfigStore.

The schemas make Hydra reject unknown keys and wrong types; `validate` then checks
the relations between settings (heads divide width, batch divides, paths exist)
and raises `ConfigError` with one sentence naming the setting and the fix.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from plait.common.checks import SettingError, choice, number
from plait.common.precision import HALF_DTYPES, float8_gemms
from plait.common.paths import unwritable_reason
from plait.data.config import DataConfig, validate_data
from plait.launch.config import LaunchConfig
from plait.launch.submit import validate_launch
from plait.offload.config import OffloadConfig, validate_offload
from plait.optim.config import OptimConfig
from plait.optim.validate import validate_optim
from plait.parallel.config import ParallelConfig
from plait.parallel.layout import Layout, LayoutError, Workload
from plait.parallel.layout import micro_batch_size as layout_micro_batch_size
from plait.parallel.layout import validate as validate_layout
from plait.parallel.pipeline.schedule import splits_backward
from plait.train.rope import ROPE_SCALINGS


ConfigError = SettingError  # every part's setting errors derive from it (LayoutError, OptimError, OffloadError, ...)


@dataclass
class ModelConfig:
    """A LLaMA-style decoder. `vocab_size` is the tokenizer's; it is padded for tp."""

    name: str = "tiny"
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # grouped-query attention when < n_heads
    ffn_dim: Optional[int] = None  # default: SwiGLU's 8/3 * dim rounded to `multiple_of`
    multiple_of: int = 32
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[str] = None  # llama3: Llama 3.1's long-context rotary frequencies | yarn (the rope_* below)
    rope_factor: float = 8.0  # llama3, yarn: low frequencies divided by this (the context this many times longer)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths past rope_original_max_len / this are scaled whole
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below rope_original_max_len / this are kept
    rope_original_max_len: int = 8192  # llama3, yarn: the context the frequencies were trained at
    rope_beta_fast: float = 32.0  # yarn: pairs turning this many times in the original context keep their frequency
    rope_beta_slow: float = 1.0  # yarn: pairs turning at most this many times are divided by rope_factor
    rope_mscale: float = 0.0  # yarn: with rope_mscale_all_dim, the rotary features' magnitude correction (DeepSeek: 1)
    rope_mscale_all_dim: float = 0.0  # yarn: its divisor, and latent attention's softmax scale x its square (DeepSeek)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dropout: float = 0.0
    base_dim: Optional[int] = None  # muP base width; default: dim (width_mult 1)
    base_head_dim: Optional[int] = None
    attn_mask: str = "causal"  # causal | document (attention stays inside each packed document)
    sliding_window: Optional[int] = None  # each token attends to itself and the W - 1 before it (Mistral)
    qk_norm: bool = False  # RMS-norm each head's query and key before rotary (OLMo 2, Qwen3)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    attention: str = "mha"  # mha: multi-head (grouped-query under n_kv_heads) | mla: DeepSeek's multi-head latent
    q_lora_rank: int = 0  # mla: queries through a latent of this rank (DeepSeek-V3: 1536); 0: one projection (V2-Lite)
    kv_lora_rank: Optional[int] = None  # mla: keys and values through a latent of this rank (DeepSeek: 512); 4 x head
    qk_nope_head_dim: Optional[int] = None  # mla: each head's query-key features without rotary (DeepSeek: 128); head
    qk_rope_head_dim: Optional[int] = None  # mla: rotary features, one key shared by the heads (DeepSeek: 64); head/2
    v_head_dim: Optional[int] = None  # mla: each head's value features (DeepSeek: 128); default dim / n_heads
    moe_experts: int = 0  # > 0: every MLP is a mixture of this many SwiGLU experts of width ffn_dim (Mixtral)
    moe_top_k: int = 2  # experts each token is routed to
    moe_aux_loss: float = 0.01  # weight of the Switch load-balancing loss (1 at an even load); 0 turns it off
    moe_aux_loss_type: str = "aux_loss"  # over what the loss counts loads: the micro-batch on this rank (aux_loss),
    # each sequence (seq_aux_loss, DeepSeek-V3) or the micro-batch on every rank of the grad group (global_aux_loss)
    moe_z_loss: float = 0.0  # weight of ST-MoE's router z-loss (mean logsumexp(logits)^2); 1e-3 is ST-MoE's
    moe_norm_topk: bool = True  # renormalize the top-k probabilities to sum to 1 (Mixtral); false: as they are (Qwen)
    moe_score_function: str = "softmax"  # router scores: softmax over experts (Mixtral, Qwen) | sigmoid (DeepSeek-V3)
    moe_topk_scaling_factor: float = 1.0  # the chosen experts' weights times this (DeepSeek-V3: 2.5)
    moe_shared_ffn_dim: int = 0  # > 0: a shared expert of this width, sigmoid-gated, beside the routed (Qwen2-MoE)
    moe_shared_gate: bool = True  # false: the shared expert's output added ungated (DeepSeek's shared experts)
    moe_router_groups: int = 1  # > 1: experts in this many groups; each token routes within its best groups
    moe_router_group_topk: int = 1  # how many groups each token may route to (DeepSeek-V3: 4 of 8)
    moe_capacity_factor: Optional[float] = None  # each expert takes <= ceil(c T k / E) pairs in training; None: all
    moe_drop_policy: str = "probs"  # over capacity, keep the highest router weights (probs) or earliest tokens
    moe_bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing, a routing bias per expert (DeepSeek-V3: 1e-3)
    mtp_layers: int = 0  # > 0: DeepSeek-V3's multi-token prediction, this many depths after the last layer
    mtp_weight: float = 0.1  # the MTP losses' weight: their mean times this joins the loss's gradient (DeepSeek: 0.3)


@dataclass
class TrainConfig:
    """The loop: steps, batch, precision, evaluation, seeds."""

    steps: int = 250
    batch_size: int = 16  # global batch, in sequences, summed over dp and micro-batches
    rampup_batch_size: Optional[List[int]] = None  # [start, increment, samples]: the batch grows to batch_size
    seq_len: int = 256
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 | fp16 | fp8 (autocast; master weights stay fp32; fp16 scales the loss;
    # fp8: bf16 autocast with the linear layers' GEMMs in float8, plait.parallel.float8)
    loss_scale: Optional[float] = None  # fp16 only: null scales dynamically, a number is a static scale
    loss_scale_initial: float = 65536.0  # fp16, dynamic: the first scale (2^16)
    loss_scale_window: int = 1000  # fp16, dynamic: steps without an overflow before the scale doubles
    loss_scale_hysteresis: int = 2  # fp16, dynamic: the overflow since the last growth from which each halves
    loss_scale_min: float = 1.0  # fp16, dynamic: the scale never goes below this
    compile: str = "auto"  # auto (on for CUDA, off on CPU and with activation offload) | true | false
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    log_params_norm: bool = False  # log the L2 norm of all the weights each step (Megatron's --log-params-norm)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    peak_flops: float = 0.0  # per device, for MFU; 0: the datasheet's dense peak (train/peaks.py), else measured
    resume: str = "none"  # none | auto | a checkpoint directory
    z_loss: float = 0.0  # PaLM's z-loss: + z x mean(logsumexp(logits)^2) in training (1e-4 in PaLM)
    loss_chunks: int = 0  # > 0: head + loss in this many sequence slices, recomputed in backward (no whole logits)
    max_minutes: float = 0.0  # stop (checkpointed, exit 0) once this many minutes have passed; 0: no limit
    profile_steps: Optional[List[int]] = None  # [first, last]: torch.profiler traces of these steps, one per rank
    dry_run: bool = False
    run_dir: Optional[str] = None  # default: outputs/<date>/<time>
    progress: bool = True


@dataclass
class CheckpointConfig:
    """Checkpoints: every N steps (0: only at the end), keep the last K (and milestones)."""

    every: int = 0
    keep: int = 2
    keep_every: int = 0  # milestones: checkpoints at multiples of this step are never pruned (0: none)
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    save_final: bool = True
    async_save: bool = True  # snapshot to host memory, write in the background (`async` is a Python keyword)
    on_error: str = "stop"  # a failed write: stop (at the next save or the end, exit 2) | continue (say so)
    init_from: Optional[str] = None  # initial weights only: a Hugging Face Llama directory or a plait checkpoint


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "plait"
    name: Optional[str] = None


@dataclass
class LoggingConfig:
    """Metric sinks: the console and a JSONL file always; wandb and TensorBoard on demand."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    level: str = "INFO"


@dataclass
class Config:
    """The whole run. Each field is a Hydra config group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def register_schemas() -> None:
    """Store the root schema in Hydra's ConfigStore: every group's YAML merges into its typed field."""
    ConfigStore.instance().store(name="plait_schema", node=Config)


register_schemas()


def load_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> Config:
    """Compose plait's config from Python with Hydra's compose API (same validation as the CLI).

    Returns the typed OmegaConf object (attribute access, schema-checked); call
    `validate` on it to check the relations between settings.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module="plait.configs", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    OmegaConf.set_readonly(cfg.hydra if "hydra" in cfg else cfg, False)
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what the run directory records)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def ffn_dim(model: ModelConfig) -> int:
    """SwiGLU hidden width: 8/3 of dim rounded up to `multiple_of`, unless given."""
    if model.ffn_dim:
        return int(model.ffn_dim)
    hidden = int(8 * model.dim / 3)
    return model.multiple_of * ((hidden + model.multiple_of - 1) // model.multiple_of)


def kv_heads(model: ModelConfig) -> int:
    return int(model.n_kv_heads or model.n_heads)


ATTENTIONS = ("mha", "mla")
LATENT_KEYS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")  # (and q_lora_rank, 0 when off)


@dataclass(frozen=True)
class LatentDims:
    """Multi-head latent attention's sizes (`model.attention=mla`), the defaults filled in from the head size h =
    dim / n_heads: the query latent's rank (0: none), the key-value latent's, and per head the query-key features
    without and with rotary and the value features."""

    q_rank: int
    kv_rank: int
    nope: int
    rope: int
    v: int

    @property
    def qk(self) -> int:
        """Each head's query-key size (the softmax scale is its inverse square root)."""
        return self.nope + self.rope


def latent_dims(model: ModelConfig) -> LatentDims:
    """The model config's latent attention sizes, each default filled in from the head size."""
    head = model.dim // model.n_heads
    return LatentDims(int(model.q_lora_rank or 0), int(model.kv_lora_rank or 4 * head),
                      int(model.qk_nope_head_dim or head), int(model.qk_rope_head_dim or head // 2),
                      int(model.v_head_dim or head))


def rotary_dim(model: ModelConfig) -> int:
    """The features each head turns by position: the head size, or under MLA its rotary part."""
    return latent_dims(model).rope if model.attention == "mla" else model.dim // model.n_heads


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_model(model: ModelConfig) -> None:
    """Shape rules of the decoder itself (its split over a layout is `plait.parallel.layout`'s)."""
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
        number(ConfigError, f"model.{key}", getattr(model, key), low=1, integer=True)
    for key in ("n_kv_heads", "ffn_dim", "base_dim", "base_head_dim", "sliding_window"):
        if getattr(model, key) is not None:
            number(ConfigError, f"model.{key}", getattr(model, key), low=1, integer=True)
    number(ConfigError, "model.dropout", model.dropout, low=0, high=1, high_open=True)
    number(ConfigError, "model.norm_eps", model.norm_eps, low=0, low_open=True)
    number(ConfigError, "model.rope_theta", model.rope_theta, low=0, low_open=True)
    if model.rope_scaling is not None:
        choice(ConfigError, "model.rope_scaling", model.rope_scaling, ROPE_SCALINGS)
        for key in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
            number(ConfigError, f"model.{key}", getattr(model, key), low=0, low_open=True,
                   integer=key == "rope_original_max_len")
        _require(model.rope_high_freq_factor > model.rope_low_freq_factor,
                 f"model.rope_high_freq_factor={model.rope_high_freq_factor} must exceed model.rope_low_freq_factor="
                 f"{model.rope_low_freq_factor} (Llama 3.1 uses 4 and 1).")
        for key in ("rope_beta_fast", "rope_beta_slow"):
            number(ConfigError, f"model.{key}", getattr(model, key), low=0, low_open=True)
        for key in ("rope_mscale", "rope_mscale_all_dim"):
            number(ConfigError, f"model.{key}", getattr(model, key), low=0, fix="0 leaves it out")
        _require(model.rope_beta_fast > model.rope_beta_slow,
                 f"model.rope_beta_fast={model.rope_beta_fast} must exceed model.rope_beta_slow="
                 f"{model.rope_beta_slow} (YaRN uses 32 and 1).")
    number(ConfigError, "model.init_std", model.init_std, low=0)
    number(ConfigError, "model.moe_experts", model.moe_experts, low=0, integer=True, fix="0 keeps a dense MLP")
    if model.moe_experts:
        number(ConfigError, "model.moe_top_k", model.moe_top_k, low=1, high=model.moe_experts, integer=True,
               fix=f"route each token to 1 to model.moe_experts={model.moe_experts} experts")
        number(ConfigError, "model.moe_aux_loss", model.moe_aux_loss, low=0, fix="0 turns the balancing loss off")
        number(ConfigError, "model.moe_z_loss", model.moe_z_loss, low=0, fix="0 turns the router z-loss off")
        number(ConfigError, "model.moe_shared_ffn_dim", model.moe_shared_ffn_dim, low=0, integer=True,
               fix="0 has no shared expert")
        if model.moe_capacity_factor is not None:
            number(ConfigError, "model.moe_capacity_factor", model.moe_capacity_factor, low=0, low_open=True,
                   fix="null keeps every token (dropless)")
        choice(ConfigError, "model.moe_drop_policy", model.moe_drop_policy, MOE_DROP_POLICIES)
        choice(ConfigError, "model.moe_aux_loss_type", model.moe_aux_loss_type, MOE_AUX_LOSS_TYPES)
        choice(ConfigError, "model.moe_score_function", model.moe_score_function, MOE_SCORE_FUNCTIONS)
        check_router_groups(model)
        _require(model.moe_shared_gate or model.moe_shared_ffn_dim, "model.moe_shared_gate=false leaves the gate off a "
                 "shared expert there is not (model.moe_shared_ffn_dim=0); set model.moe_shared_ffn_dim or drop it.")
        number(ConfigError, "model.moe_topk_scaling_factor", model.moe_topk_scaling_factor, low=0, low_open=True,
               fix="1 keeps the router's weights")
        number(ConfigError, "model.moe_bias_update_rate", model.moe_bias_update_rate, low=0,
               fix="0 turns the routing bias off")
    else:
        for key, default in (("moe_aux_loss_type", "aux_loss"), ("moe_score_function", "softmax"),
                             ("moe_topk_scaling_factor", 1.0), ("moe_shared_gate", True), ("moe_router_groups", 1),
                             ("moe_router_group_topk", 1)):
            _require(getattr(model, key) == default, f"model.{key}={getattr(model, key)} sets up a mixture of experts, "
                     f"but model.moe_experts=0; set model.moe_experts or drop the setting.")
        for key in ("moe_z_loss", "moe_shared_ffn_dim", "moe_capacity_factor", "moe_bias_update_rate"):
            off = "null" if key == "moe_capacity_factor" else "0"
            _require(not getattr(model, key), f"model.{key}={getattr(model, key)} sets up a mixture of experts, but "
                     f"model.moe_experts=0; set model.moe_experts or model.{key}={off}.")
    number(ConfigError, "model.mtp_layers", model.mtp_layers, low=0, integer=True, fix="0 turns it off")
    number(ConfigError, "model.mtp_weight", model.mtp_weight, low=0)
    _require(model.dim % model.n_heads == 0,
             f"model.n_heads={model.n_heads} does not divide model.dim={model.dim}; pick a head count that divides the width.")
    _require(model.n_heads % kv_heads(model) == 0,
             f"model.n_kv_heads={kv_heads(model)} does not divide model.n_heads={model.n_heads}.")
    _require(model.attention == "mla" or (model.dim // model.n_heads) % 2 == 0,
             "model.dim / model.n_heads must be even for rotary positions.")
    choice(ConfigError, "model.attn_mask", model.attn_mask, ATTN_MASKS)
    validate_attention(model)


def validate_attention(model: ModelConfig) -> None:
    """`model.attention` and, under mla, the latent sizes; the settings of one kind are refused under the other."""
    choice(ConfigError, "model.attention", model.attention, ATTENTIONS)
    number(ConfigError, "model.q_lora_rank", model.q_lora_rank, low=0, integer=True, fix="0 projects queries at once")
    if model.attention != "mla":
        for key in ("q_lora_rank",) + LATENT_KEYS:
            _require(not getattr(model, key), f"model.{key}={getattr(model, key)} sizes multi-head latent attention, "
                     f"but model.attention={model.attention}; set model.attention=mla or drop the setting.")
        return
    for key in LATENT_KEYS:
        if getattr(model, key) is not None:
            number(ConfigError, f"model.{key}", getattr(model, key), low=1, integer=True)
    for key, value in (("qk_norm", model.qk_norm), ("qkv_bias", model.qkv_bias)):
        _require(not value, f"model.{key}=true is for model.attention=mha (latent attention has no fused Q|K|V "
                 "projection); drop it or set model.attention=mha.")
    _require(kv_heads(model) == model.n_heads, f"model.n_kv_heads={model.n_kv_heads} groups key-value heads, but "
             "latent attention gives every head its own key and value from one latent; drop model.n_kv_heads.")
    rope = latent_dims(model).rope
    _require(rope % 2 == 0, f"model.qk_rope_head_dim={rope} must be even for rotary positions (pairs of features "
             "turn together); set an even size.")


ATTN_MASKS = ("causal", "document")
MOE_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")  # Megatron's moe_router_load_balancing_type
MOE_DROP_POLICIES = ("probs", "position")  # over capacity: keep the highest router weights, or the earliest tokens
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")  # Megatron's moe_router_score_function


def check_router_groups(model: ModelConfig) -> None:
    """Group-limited routing: the groups split the experts evenly, a token may route to 1 to all of them, and
    the groups it may route to hold at least its top-k experts."""
    number(ConfigError, "model.moe_router_groups", model.moe_router_groups, low=1, high=model.moe_experts,
           integer=True, fix="1 routes over every expert")
    groups, top = int(model.moe_router_groups), model.moe_router_group_topk
    _require(model.moe_experts % groups == 0, f"model.moe_router_groups={groups} does not divide "
             f"model.moe_experts={model.moe_experts}; pick a group count that splits the experts evenly.")
    number(ConfigError, "model.moe_router_group_topk", top, low=1, high=groups, integer=True,
           fix=f"route each token within 1 to model.moe_router_groups={groups} groups")
    reach = top * model.moe_experts // groups
    _require(model.moe_top_k <= reach, f"model.moe_top_k={model.moe_top_k} is more experts than the "
             f"model.moe_router_group_topk={top} groups a token may use hold ({reach}); raise the group top-k.")


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", *HALF_DTYPES)  # fp32, bf16, fp16, fp8
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
WANDB_MODES = ("disabled", "offline", "online")


def validate_train(train: TrainConfig) -> None:
    """The loop's own settings."""
    number(ConfigError, "train.steps", train.steps, low=1, integer=True)
    number(ConfigError, "train.seq_len", train.seq_len, low=1, integer=True)
    number(ConfigError, "train.seed", train.seed, low=0, integer=True)
    number(ConfigError, "train.eval_every", train.eval_every, low=0, integer=True, fix="0 turns evaluation off")
    number(ConfigError, "train.eval_batches", train.eval_batches, low=1, integer=True)
    number(ConfigError, "train.log_every", train.log_every, low=1, integer=True)
    number(ConfigError, "train.threads", train.threads, low=0, integer=True, fix="0 keeps torch's default")
    number(ConfigError, "train.peak_flops", train.peak_flops, low=0,
           fix="give the device's dense FLOP/s, or 0 for the datasheet's")
    number(ConfigError, "train.max_minutes", train.max_minutes, low=0, fix="0 sets no limit")
    number(ConfigError, "train.loss_chunks", train.loss_chunks, low=0, integer=True, fix="0 keeps whole logits")
    number(ConfigError, "train.z_loss", train.z_loss, low=0, fix="0 turns it off")
    steps = train.profile_steps
    if steps is not None:
        _require(len(steps) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in steps)
                 and 1 <= steps[0] <= steps[1] <= train.steps,
                 f"train.profile_steps={list(steps)} must be [first, last] with 1 <= first <= last <= "
                 f"train.steps={train.steps} (steps as logged, from 1).")
    choice(ConfigError, "train.precision", train.precision, PRECISIONS)
    validate_loss_scale(train)
    choice(ConfigError, "train.device", train.device, DEVICES)
    choice(ConfigError, "train.compile", str(train.compile).lower(), COMPILE_CHOICES)
    if str(train.resume or "none") not in ("none", "auto"):
        _require(Path(train.resume).expanduser().exists(),
                 f"train.resume={train.resume} does not exist; pass a checkpoint directory, a checkpoint "
                 f"root, auto or none.")
    _writable("train.run_dir", train.run_dir)


def validate_loss_scale(train: TrainConfig) -> None:
    """The fp16 loss-scale settings (a static scale given under another precision would do nothing: refused)."""
    _require(train.loss_scale is None or train.precision == "fp16",
             f"train.loss_scale={train.loss_scale} applies to train.precision=fp16 only (fp32 and bf16 need no "
             f"scaling); set train.precision=fp16 or drop train.loss_scale.")
    if train.loss_scale is not None:
        number(ConfigError, "train.loss_scale", train.loss_scale, low=0, low_open=True,
               fix="give a positive scale, or null for a dynamic one")
    number(ConfigError, "train.loss_scale_initial", train.loss_scale_initial, low=0, low_open=True)
    number(ConfigError, "train.loss_scale_min", train.loss_scale_min, low=0, low_open=True)
    number(ConfigError, "train.loss_scale_window", train.loss_scale_window, low=1, integer=True)
    number(ConfigError, "train.loss_scale_hysteresis", train.loss_scale_hysteresis, low=1, integer=True)
    _require(train.loss_scale_min <= train.loss_scale_initial,
             f"train.loss_scale_min={train.loss_scale_min} is above train.loss_scale_initial="
             f"{train.loss_scale_initial}; lower the minimum or raise the initial scale.")


def validate_checkpoint(checkpoint: CheckpointConfig) -> None:
    number(ConfigError, "checkpoint.every", checkpoint.every, low=0, integer=True, fix="0 saves only at the end")
    number(ConfigError, "checkpoint.keep", checkpoint.keep, low=0, integer=True, fix="0 keeps every checkpoint")
    number(ConfigError, "checkpoint.keep_every", checkpoint.keep_every, low=0, integer=True,
           fix="0 keeps no milestones beyond checkpoint.keep")
    if checkpoint.init_from:
        _require(Path(checkpoint.init_from).expanduser().exists(),
                 f"checkpoint.init_from={checkpoint.init_from} does not exist; pass a Hugging Face Llama "
                 f"directory or a plait checkpoint.")
    choice(ConfigError, "checkpoint.on_error", checkpoint.on_error, ("stop", "continue"))
    _writable("checkpoint.dir", checkpoint.dir)


def validate_logging(logging_cfg: LoggingConfig) -> None:
    choice(ConfigError, "logging.level", str(logging_cfg.level).upper(), LOG_LEVELS)
    choice(ConfigError, "logging.wandb.mode", logging_cfg.wandb.mode, WANDB_MODES)


def _writable(key: str, path: Optional[str]) -> None:
    """A directory the run will write, checked before any work (nothing is created to find out)."""
    if path:
        reason = unwritable_reason(path)
        _require(reason is None, f"{key}={path} is not a writable directory ({reason}); point {key} at a "
                                 f"directory this process can write.")


def unknown_keys(node: Any, schema: Any = None, prefix: str = "") -> List[str]:
    """Keys of the composed config that no schema field names (`+train.bogus=1` adds one past Hydra's check)."""
    schema = schema or Config
    names = {f.name: f for f in dataclasses.fields(schema)}
    found = []
    for key in node.keys():
        if key == "hydra" and not prefix:
            continue
        if key not in names:
            found.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(names[key].type) and OmegaConf.is_config(node[key]):
            found += unknown_keys(node[key], names[key].type, f"{prefix}{key}.")
    return found


def workload(cfg: Config) -> Workload:
    """What the layout must divide, from the model and the step."""
    model = cfg.model
    return Workload(n_heads=int(model.n_heads), n_kv_heads=kv_heads(model), ffn_dim=ffn_dim(model),
                    n_layers=int(model.n_layers), seq_len=int(cfg.train.seq_len), batch_size=cfg.train.batch_size,
                    tie_embeddings=bool(model.tie_embeddings), moe_experts=int(model.moe_experts),
                    moe_shared_ffn_dim=int(model.moe_shared_ffn_dim) if model.moe_experts else 0)


def check_layout(cfg: Config, world_size: int) -> Layout:
    """The layout for `world_size` ranks under every layout rule (plait.parallel.layout), as a ConfigError."""
    return validate_layout(cfg.parallel, world_size, workload(cfg))


def micro_batch_size(cfg: Config, dp: int) -> int:
    """Sequences per micro-batch: batch_size / (dp x microbatches)."""
    try:
        return layout_micro_batch_size(cfg.train.batch_size, dp, cfg.parallel.microbatches)
    except LayoutError as error:
        raise ConfigError(str(error)) from None


COMPILE_CHOICES = ("auto", "true", "false")


def compile_wanted(train_compile: Any, device_type: str, offload_backend: str,
                   split_backward: bool = False) -> Tuple[bool, str]:
    """(compile?, why) for `train.compile`: auto compiles on CUDA (about 20% faster there, measured on an
    H200) and not on CPU, nor with activation offload (its saved-tensor hooks do not trace), nor under a
    zero-bubble schedule (a compiled chunk's backward is one autograd node: it cannot be split in I and W)."""
    choice = str(train_compile).lower()
    if choice != "auto":
        return choice == "true", f"train.compile={choice}"
    if offload_backend != "none":
        return False, "auto: off with activation offload"
    if split_backward:
        return False, "auto: off under a zero-bubble schedule"
    return device_type == "cuda", f"auto: {'on' if device_type == 'cuda' else 'off'} on {device_type}"


def check_rampup(cfg: Config, dp: int) -> None:
    """`train.rampup_batch_size=[start, increment, samples]`: every batch on the way holds whole micro-batches on
    every dp rank, the increments land on train.batch_size, and the smallest batch's micro-batch count is one the
    pipeline schedule takes (the schedules' rules are lower bounds)."""
    from plait.parallel.layout import check_pipeline

    ramp, final = cfg.train.rampup_batch_size, cfg.train.batch_size
    if ramp is None:
        return
    key = f"train.rampup_batch_size={list(ramp)}"
    _require(len(ramp) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ramp),
             f"{key} must be three positive integers [start, increment, samples] (Megatron's --rampup-batch-size).")
    start, increment, samples = ramp
    unit = dp * micro_batch_size(cfg, dp)
    _require(start < final,
             f"{key} starts at {start}, not below train.batch_size={final}; start lower or drop the ramp.")
    _require(start % unit == 0 and increment % unit == 0,
             f"{key}: start and increment must be multiples of dp x micro-batch = {dp} x {unit // dp} = {unit} "
             f"(each step holds whole micro-batches on every dp rank).")
    _require((final - start) % increment == 0,
             f"{key}: train.batch_size={final} - start {start} is not a multiple of the increment {increment}; "
             f"pick an increment that divides {final - start}.")
    parallel = cfg.parallel
    smallest = SimpleNamespace(pp=parallel.pp, vpp=parallel.vpp, schedule=parallel.schedule,
                               microbatches=start // unit)
    try:
        check_pipeline(smallest, cfg.model.n_layers, bool(cfg.model.tie_embeddings))
    except LayoutError as error:
        raise ConfigError(f"{key} starts at {start // unit} micro-batches per step, which the pipeline refuses: "
                          f"{error}") from None


def check_loss_chunks(cfg: Config) -> None:
    """`train.loss_chunks` slices the tokens a rank holds at the head's input: seq_len / cp, and / tp more under
    sequence parallelism; it must divide them (equal slices keep the mean loss exact)."""
    chunks, parallel = int(cfg.train.loss_chunks), cfg.parallel
    if not chunks:
        return
    sequence_parallel = bool(parallel.sequence_parallel) and parallel.tp > 1
    local = cfg.train.seq_len // parallel.cp // (parallel.tp if sequence_parallel else 1)
    held = "train.seq_len / parallel.cp" + (" / parallel.tp (sequence parallel)" if sequence_parallel else "")
    _require(local % chunks == 0,
             f"train.loss_chunks={chunks} does not divide the {local} tokens a rank holds at the head ({held}); "
             f"pick a divisor of {local}.")
    _require(not (parallel.zero == 3 and splits_backward(parallel)),
             f"train.loss_chunks={chunks} with parallel.zero=3 under parallel.schedule={parallel.schedule}: the weight "
             f"half of the split backward would recompute the head after ZeRO-3 has let its weights go; use "
             f"parallel.zero=2, a schedule without a split backward, or train.loss_chunks=0.")


def check_float8(cfg: Config) -> None:
    """`train.precision=fp8`: the linear layers' float8 GEMMs (plait.parallel.float8) need each width a multiple of
    16 on CUDA (checked on every device, so a config tried on CPU runs on the GPU), and run through autograd."""
    if not float8_gemms(cfg.train.precision):
        return
    model, parallel = cfg.model, cfg.parallel
    _require(str(parallel.tp_overlap).lower() != "true",
             "train.precision=fp8 runs the column-parallel layers' GEMMs through autograd, which "
             "parallel.tp_overlap=true replaces with a backward of its own; set parallel.tp_overlap=auto (off under "
             "fp8) or false.")
    head_dim, tp = model.dim // model.n_heads, parallel.tp
    if model.attention == "mla":  # its column- and row-parallel layers' widths (the down projections stay as they are)
        dims, heads = latent_dims(model), model.n_heads
        attention = {"n_heads x (qk_nope_head_dim + qk_rope_head_dim) / parallel.tp": heads * dims.qk // tp,
                     "n_heads x (qk_nope_head_dim + v_head_dim) / parallel.tp": heads * (dims.nope + dims.v) // tp,
                     "n_heads x v_head_dim / parallel.tp": heads * dims.v // tp,
                     "model.kv_lora_rank": dims.kv_rank, **({"model.q_lora_rank": dims.q_rank} if dims.q_rank else {})}
    else:
        attention = {"the query width / parallel.tp": model.n_heads * head_dim // tp,
                     "the key-value width / parallel.tp": kv_heads(model) * head_dim // tp}
    sizes = {"model.dim": model.dim, **attention,
             f"the {'expert' if model.moe_experts else 'MLP'} width / parallel.tp": ffn_dim(model) // tp}
    if model.moe_experts and model.moe_shared_ffn_dim:
        sizes["model.moe_shared_ffn_dim / parallel.tp"] = model.moe_shared_ffn_dim // tp
    wrong = [f"{name} is {size}" for name, size in sizes.items() if size % 16]
    _require(not wrong, f"train.precision=fp8 runs float8 GEMMs, whose sizes must be multiples of 16, but "
                        f"{'; '.join(wrong)}: change them, or use train.precision=bf16.")


def validate(cfg: Config, world_size: int = 1) -> int:
    """Check every setting and every relation between settings before any process group is made; returns dp.

    Each group is checked by its owner (the layout by plait.parallel, the optimizer by plait.optim,
    ...); each raises its own error class, all of them ConfigError (plait.common.checks.SettingError).
    """
    extra = unknown_keys(cfg)
    _require(not extra, f"{', '.join(extra)} {'is not a setting' if len(extra) == 1 else 'are not settings'} of "
                        f"plait; check the spelling (`plait-train --cfg job` prints every setting).")
    validate_model(cfg.model)
    validate_train(cfg.train)
    validate_checkpoint(cfg.checkpoint)
    validate_logging(cfg.logging)
    validate_optim(cfg.optim)
    validate_data(cfg.data)
    validate_launch(cfg.launch)
    validate_offload(cfg.offload)  # settings, and offload.path writable
    dp = check_layout(cfg, world_size).dp
    check_rampup(cfg, dp)
    check_loss_chunks(cfg)
    check_float8(cfg)
    _require(cfg.train.seq_len <= cfg.model.max_seq_len,
             f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}.")
    _require(cfg.parallel.cp == 1 or cfg.model.dropout == 0,
             f"model.dropout={cfg.model.dropout} with parallel.cp={cfg.parallel.cp} is not supported (each cp rank "
             f"would need the mask of its own tokens); set model.dropout=0 or parallel.cp=1.")
    masked = "model.attn_mask=document" if cfg.model.attn_mask == "document" else \
        f"model.sliding_window={cfg.model.sliding_window}" if cfg.model.sliding_window is not None else None
    _require(masked is None or cfg.parallel.cp == 1 or cfg.parallel.cp_mode == "ulysses",
             f"{masked} with parallel.cp={cfg.parallel.cp} needs parallel.cp_mode=ulysses (each rank attends over "
             f"the whole sequence there; ring attention's blocks take no attention mask).")
    _require(not (splits_backward(cfg.parallel) and str(cfg.train.compile).lower() == "true"),
             f"parallel.schedule={cfg.parallel.schedule} splits each backward in two, which a compiled chunk (one "
             f"autograd node) cannot do; set train.compile=false or another parallel.schedule.")
    _require(not (cfg.model.moe_experts and cfg.model.moe_aux_loss_type == "seq_aux_loss" and cfg.parallel.cp > 1),
             f"model.moe_aux_loss_type=seq_aux_loss balances each sequence, which parallel.cp={cfg.parallel.cp} splits "
             f"over ranks; set model.moe_aux_loss_type=global_aux_loss (over every rank's tokens) or parallel.cp=1.")
    _require(cfg.offload.backend == "none" or str(cfg.train.compile).lower() != "true",
             f"offload.backend={cfg.offload.backend} uses saved-tensor hooks, which train.compile=true does not "
             f"support; set train.compile=false or offload.backend=none.")
    return dp
