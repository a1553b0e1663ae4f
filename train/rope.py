"""Rotary position frequencies: the plain ones, and Llama 3.1's for long contexts (`model.rope_scaling=llama3`).

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


# model.rope_scaling -> how the plain frequencies change (None: they do not)
ROPE_SCALINGS: Dict[str, Callable[[torch.Tensor, object], torch.Tensor]] = {"llama3": llama3_frequencies}


def rotary_tables(cfg, device=None, head_dim: Optional[int] = None):
    """cos and sin of the rotary angles of the model config `cfg`, [max_seq_len, head_dim / 2]; `head_dim` is the
    features that turn (default dim / n_heads; latent attention's rotary part)."""
    frequencies = plain_frequencies(head_dim or cfg.dim // cfg.n_heads, cfg.rope_theta, device)
    if cfg.rope_scaling is not None:
        frequencies = ROPE_SCALINGS[cfg.rope_scaling](frequencies, cfg)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), frequencies)
    return angles.cos(), angles.sin()
