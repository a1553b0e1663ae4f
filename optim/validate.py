"""The `optim` group's rules: every field against its range, every choice against the table that builds it."""

from plait.common.checks import SettingError, choice, number
from plait.optim.builder import OPTIMIZERS
from plait.optim.config import OptimConfig
from plait.optim.lion import IMPLS
from plait.optim.muon import ADJUSTMENTS, NS_DTYPES
from plait.optim.schedule import DECAYS, SCHEDULES


class OptimError(SettingError):
    """An optimizer setting that cannot work, in one sentence naming it."""


def validate_optim(cfg: OptimConfig) -> None:
    choice(OptimError, "optim.name", cfg.name, OPTIMIZERS)
    choice(OptimError, "optim.schedule", cfg.schedule, SCHEDULES)
    choice(OptimError, "optim.decay_shape", cfg.decay_shape, DECAYS)
    number(OptimError, "optim.decay_fraction", cfg.decay_fraction, low=0, high=1, low_open=True)
    choice(OptimError, "optim.impl", cfg.impl, IMPLS)
    number(OptimError, "optim.lr", cfg.lr, low=0, low_open=True)
    number(OptimError, "optim.min_lr_ratio", cfg.min_lr_ratio, low=0, high=1)
    number(OptimError, "optim.warmup_steps", cfg.warmup_steps, low=0, integer=True)
    number(OptimError, "optim.weight_decay", cfg.weight_decay, low=0)
    number(OptimError, "optim.eps", cfg.eps, low=0, low_open=True)
    number(OptimError, "optim.grad_clip", cfg.grad_clip, low=0, fix="0 turns clipping off")
    if len(cfg.betas) != 2:
        raise OptimError(f"optim.betas={list(cfg.betas)} must be two numbers, e.g. [0.9, 0.95].")
    for index, beta in enumerate(cfg.betas):
        number(OptimError, f"optim.betas[{index}]", beta, low=0, high=1, high_open=True)
    for key in ("mup_input_mult", "mup_output_mult", "mup_attn_mult"):
        number(OptimError, f"optim.{key}", getattr(cfg, key), low=0, low_open=True)
    number(OptimError, "optim.muon_momentum", cfg.muon_momentum, low=0, high=1, high_open=True)
    number(OptimError, "optim.muon_ns_steps", cfg.muon_ns_steps, low=1, high=99, integer=True)
    choice(OptimError, "optim.muon_ns_dtype", cfg.muon_ns_dtype, NS_DTYPES)
    choice(OptimError, "optim.muon_adjust_lr", cfg.muon_adjust_lr, ADJUSTMENTS)
    if cfg.muon_lr is not None:
        number(OptimError, "optim.muon_lr", cfg.muon_lr, low=0, low_open=True, fix="set a positive number, or null for optim.lr")
    if cfg.name == "muon" and cfg.mup:
        raise OptimError("optim.mup=true does not apply to optim=muon, which scales each matrix's step by its own "
                         "shape (optim.muon_adjust_lr); set optim.mup=false or choose optim=adamw or lion.")
