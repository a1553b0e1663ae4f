"""Rotary position frequencies: the plain ones, Llama 3.1's for long contexts (`model.rope_scaling=llama3`), and
YaRN's (`model.rope_scaling=yarn`: DeepSeek-V3, Qwen's long-context configs).

Each pair of a head's features turns at its own frequency, theta^(-2i / head_dim). Llama 3.1
keeps the high frequencies (wavelengths below `original_max_len / high_freq_factor`), divides
the low ones (wavelengths past `original_max_len / low_freq_factor`) by `factor`, and blends
the two in between, so a model trained at `original_max_len` tokens reaches `factor` times
farther. The numbers are Hugging Face's `rope_type: llama3` (the Llama 3.1/3.2/3.3 configs), so
`checkpoint.init_from` and `plait export` carry them both ways.
"""

import math
from typing import Callable, Dict, Optional

import torch


def plain_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i / head_dim) for each of the head_dim / 2 feature pairs, fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def llama3_frequencies(frequencies: torch.Tensor, cfg) -> torch.Tensor:
    """Llama 3.1's rescaling of `frequencies` by the model config's rope_* settings."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_len
    wavelength = 2 * math.pi / frequencies
    scaled = torch.where(wavelength > original / low, frequencies / factor, frequencies)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = ~(wavelength < original / high) & ~(wavelength > original / low)
    return torch.where(between, blended, scaled)


def yarn_frequencies(frequencies: torch.Tensor, cfg) -> torch.Tensor:
    """YaRN's (Peng et al. 2023) frequencies for the model config's rope_* settings, as Hugging Face computes them.

    Pairs that turn at least `rope_beta_fast` times within the original context keep their frequency, pairs that
    turn at most `rope_beta_slow` times are divided by `rope_factor` (interpolated), and a linear ramp over the pair
    index blends the two between."""
    dim, theta, factor = 2 * frequencies.shape[0], cfg.rope_theta, cfg.rope_factor
    powers = theta ** (torch.arange(0, dim, 2, device=frequencies.device, dtype=torch.float32) / dim)

    def pair_of(rotations: float) -> float:  # the pair index that turns `rotations` times in the original context
        return dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_of(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(pair_of(cfg.rope_beta_slow)), dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(frequencies.device)
    kept = 1 - ramp  # how much of each pair's own frequency stays
    return 1.0 / (factor * powers) * (1 - kept) + 1.0 / powers * kept


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times longer: 0.1 x mscale x ln(factor) + 1 (1 at 1x)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rotary_magnitude(cfg) -> float:
    """What cos and sin are multiplied by: 1, or under YaRN its attention factor (with `rope_mscale` and
    `rope_mscale_all_dim` both set, their corrections' ratio, DeepSeek's; else the correction of the factor)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
    return yarn_mscale(cfg.rope_factor)


# model.rope_scaling -> how the plain frequencies change (None: they do not)
ROPE_SCALINGS: Dict[str, Callable[[torch.Tensor, object], torch.Tensor]] = {"llama3": llama3_frequencies,
                                                                              "yarn": yarn_frequencies}


def rotary_tables(cfg, device=None, head_dim: Optional[int] = None):
    """cos and sin of the rotary angles of the model config `cfg`, [max_seq_len, head_dim / 2]; `head_dim` is the
    features that turn (default dim / n_heads; latent attention's rotary part)."""
    frequencies = plain_frequencies(head_dim or cfg.dim // cfg.n_heads, cfg.rope_theta, device)
    if cfg.rope_scaling is not None:
        frequencies = ROPE_SCALINGS[cfg.rope_scaling](frequencies, cfg)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), frequencies)
    magnitude = rotary_magnitude(cfg)
    if magnitude != 1.0:  # (YaRN: the rotated features, and so the logits they make, scaled)
        return angles.cos() * magnitude, angles.sin() * magnitude
    return angles.cos(), angles.sin()
