"""Multi-head latent attention (DeepSeek-V2 section 2.1, as DeepSeek-V3 uses it): `model.attention=mla`.

Keys and values come from one small latent per token instead of a projection per head. For a token x of width d
and H heads (sizes: `plait.train.config.latent_dims`):

    queries         q = wq(x), or wq_b(q_a_norm(wq_a(x))) under model.q_lora_rank      [H, nope + rope]
    latent          c, k_rope = wkv_a(x)                                                [kv_rank], [rope]
    keys, values    k_nope, v = wkv_b(kv_a_norm(c))                                     [H, nope], [H, v]
    each head       k = [k_nope ; rotary(k_rope)] (one rotary key for all heads),  q = [q_nope ; rotary(q_rope)]
    out             wo(softmax(q k^T / sqrt(nope + rope)) v)

Positions reach the keys only through the small shared rotary part, so at inference the model caches the latent
and that part: kv_rank + rope numbers a token, against 2 H x head size. Decoding (`absorb`, which
`plait.train.decode.caches_in` sets) attends in the latent space, as DeepSeek's inference does: each head's query
without rotary goes through its key up-projection first (q_nope W_k, kv_rank wide), all heads attend to the one
cached [latent ; rotated key] (one key-value head), and each head's weighted latent goes through its value
up-projection after. The keys and values are never expanded per head.

The values are zero-padded to the query-key size when they are narrower, and the padding is cut from the output:
the fused attention kernels take one head size (with two, the CPU runs the math kernel, twice the time at the
tiny model's sizes), and every attention seam (SDPA, the ring and Ulysses under cp, the decoding cache) then
takes latent attention as it is.

Under tp (`plait.train.build.LLAMA_PLAN`) each rank holds its heads: wq or wq_b and wkv_b are column-parallel,
wo row-parallel. The down projections and their norms are whole on every rank, on the sequence shard under SP
(their grads partial then). The shared rotary key enters the heads' region through `shared_key`, as a
column-parallel layer's input does (copied with its grad summed over tp, or gathered over the sequence under SP).
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from plait.train.attention_mask import AttentionMask
from plait.train.config import ModelConfig, latent_dims
from plait.train.model import Linear, RMSNorm, Scales, apply_rotary, choose_attention, first_rows, identity
from plait.train.rope import yarn_mscale


class RegionEntry(nn.Module):
    """Where a tensor enters the tensor-parallel heads' region: the identity alone; a plan (`ColumnInput`) sets
    `mapping` to a column-parallel layer's input mapping."""

    def __init__(self):
        super().__init__()
        self.mapping: Callable = identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(x)


class LatentAttention(nn.Module):
    """Causal multi-head latent attention, with the seams `plait.train.model.Attention` has: `attend(q, k, v, scale,
    enable_gqa, mask=None)` and `rope_rows(s, device)`, set by context parallelism or a decoding cache."""

    def __init__(self, cfg: ModelConfig, scales: Scales, device: Optional[torch.device] = None):
        super().__init__()
        dims = latent_dims(cfg)
        self.nope, self.rope, self.v_dim, self.qk_dim = dims.nope, dims.rope, dims.v, dims.qk
        self.v_pad = max(0, dims.qk - dims.v)
        heads = cfg.n_heads
        self.wq = None if dims.q_rank else Linear(cfg.dim, heads * dims.qk, device=device)
        self.wq_a = Linear(cfg.dim, dims.q_rank, device=device) if dims.q_rank else None
        self.q_a_norm = RMSNorm(dims.q_rank, cfg.norm_eps, device) if dims.q_rank else None
        self.wq_b = Linear(dims.q_rank, heads * dims.qk, device=device) if dims.q_rank else None
        self.wkv_a = Linear(cfg.dim, dims.kv_rank + dims.rope, segments=(dims.kv_rank, dims.rope), device=device)
        self.kv_a_norm = RMSNorm(dims.kv_rank, cfg.norm_eps, device)
        self.wkv_b = Linear(dims.kv_rank, heads * (dims.nope + dims.v), device=device)
        self.wo = Linear(heads * dims.v, cfg.dim, device=device)
        self.shared_key = RegionEntry()
        self.scale = scales.attention if scales.attention is not None else 1.0 / math.sqrt(dims.qk)
        if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:  # DeepSeek's YaRN: every feature's logit too
            self.scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
        self.attend = choose_attention(device if device is not None else "cpu")
        self.rope_rows: Callable = first_rows
        self.absorb = False  # decoding: attend over cached latents (a decoding cache sets it with `attend`)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, heads here x (nope + rope)]: straight from x, or through the query latent."""
        if self.wq is not None:
            return self.wq(x)
        return self.wq_b(self.q_a_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[AttentionMask] = None) -> torch.Tensor:
        latent, k_rope = self.wkv_a(x, segmented=True)
        latent = self.kv_a_norm(latent)
        q = self.queries(x)
        b, s, _ = q.shape  # (the whole sequence under SP: the column-parallel layers gathered it)
        q_nope, q_rope = q.view(b, s, -1, self.qk_dim).transpose(1, 2).split((self.nope, self.rope), dim=-1)
        rows = self.rope_rows(s, cos.device)
        cos, sin = cos[rows], sin[rows]
        k_rope = apply_rotary(self.shared_key(k_rope).unsqueeze(1), cos, sin)  # [b, 1, s, rope]: one for all heads
        q_rope = apply_rotary(q_rope, cos, sin)
        attend = self.attend_latents if self.absorb else self.attend_heads
        out = attend(q_nope, q_rope, latent, k_rope, mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    def attend_heads(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Training's form: each head's keys and values from the latent, then attention over them; [b, heads, s, v]."""
        kv = self.wkv_b(latent)
        b, s, _ = kv.shape
        k_nope, v = kv.view(b, s, -1, self.nope + self.v_dim).transpose(1, 2).split((self.nope, self.v_dim), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, q.shape[1], -1, -1)), dim=-1)
        if self.v_pad:
            v = F.pad(v, (0, self.v_pad))
        out = self.attend(q, k, v, self.scale, False, mask)
        return out[..., :self.v_dim] if self.v_pad else out

    def attend_latents(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Decoding's form (the same numbers): every head attends to the one [latent ; rotated key] per token through
        `attend` (the cache, which keeps those alone, as keys and as values), its query without rotary first taken
        into the latent space by its key up-projection, its weighted latent out by its value up-projection;
        [b, heads, s, v]."""
        up = self.wkv_b.weight.view(-1, self.nope + self.v_dim, latent.shape[-1])  # [heads, nope + v, kv_rank]
        key_up, value_up = up.split((self.nope, self.v_dim), dim=1)
        q = torch.cat((torch.matmul(q_nope, key_up), q_rope), dim=-1)  # [b, heads, s, kv_rank + rope]
        keys = torch.cat((latent.unsqueeze(1), k_rope), dim=-1)  # [b, 1, s, kv_rank + rope]: one head for all
        # the keys serve as the values too (one head size: the fused kernel), the rotary part of the output cut after
        out = self.attend(q, keys, keys, self.scale, True, mask)[..., :latent.shape[-1]]
        return torch.matmul(out, value_up.transpose(1, 2))
