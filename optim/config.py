"""The `optim` config group: optimizer, learning-rate schedule, clipping, muP."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class OptimConfig:
    """Optimizer settings; `lr` is the peak learning rate of the base width under muP."""

    name: str = "adamw"  # adamw | lion | muon (Muon for hidden matrices, AdamW for the rest)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the share of train.steps that decays, at the end
    decay_shape: str = "sqrt"  # wsd: linear | cosine | sqrt (1 - sqrt(progress))
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    impl: str = "auto"  # auto | fused | foreach | triton | compiled | deepspeed (Lion's kernels; AdamW: torch fused or foreach)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_ns_dtype: str = "bfloat16"  # bfloat16 | float32
    muon_adjust_lr: str = "match_rms_adamw"  # match_rms_adamw (0.2 sqrt(max(A, B)): AdamW's lr) | original
    muon_lr: Optional[float] = None  # the Muon matrices' peak lr (null: optim.lr; "original" wants ~0.02)
    mup: bool = False
    mup_input_mult: float = 1.0
    mup_output_mult: float = 1.0
    mup_attn_mult: float = 1.0
    mup_zero_readout: bool = False
    mup_zero_query: bool = False
