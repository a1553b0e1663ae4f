"""Context parallelism: the sequence split across the `cp` ranks, attention computed across them.

Each cp rank holds 2 of the 2 x cp equal chunks of every sequence: chunks r and 2cp - 1 - r
(the load-balanced split of Megatron-core and ring-flash-attention's "zigzag"): under a
causal mask the early chunks attend to little and the late ones to much, and pairing an
early chunk with a late one gives every rank the same work. `positions(seq_len, cp, rank)`
are a rank's tokens' places in the sequence (rotary positions follow them), and
`split_sequence` cuts a rank's tokens out of a batch.

Two ways to attend across the ranks (`parallel.cp_mode`):

- **ring** (`ring_attention`): K and V go round the ring of cp ranks; each rank attends its
  queries to the block it holds, merges the partial result by log-sum-exp (the online
  softmax: out = sum_b exp(lse_b - lse) out_b, lse = log sum_b exp(lse_b)), and has already
  posted the send of that block to the next rank and the receive of the next block from the
  previous one, so the transfer runs while it computes. Under the causal mask and the
  zigzag split, step 0 (its own block) is causal within the two chunks, a block from an
  earlier rank is attended whole by both query chunks but only its first chunk (its second
  lies after both), and a block from a later rank only by the second query chunk: half a
  block of work at every step but the first. The backward passes K and V round again with
  the grads of K and V travelling beside them, each rank adding its queries' share; after
  the last step one more hop brings each rank the grads of its own K and V.
- **ulysses** (`ulysses_attention`, DeepSpeed-Ulysses): an all-to-all turns sequence-sharded
  q, k, v into head-sharded ones over the whole sequence, attention runs locally, and the
  inverse all-to-all turns the output back. Needs the (kv) heads divisible by cp.

The attention of one block runs in fp32 through the CPU flash-attention kernel, which
returns the log-sum-exp the merge needs and whose backward takes the merged output and
log-sum-exp back (reached through `plait.common.compat`: SDPA's public call drops the
log-sum-exp); elsewhere (CUDA, for now) from its scores. The output is cast to the inputs'
dtype. GQA: K and V travel with their own (fewer) heads and are repeated to the
query heads only to compute; their grads are summed back.
"""

import functools
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.common.compat import cpu_flash_attention

CP_MODES = ("ring", "ulysses")


@functools.lru_cache(maxsize=64)
def positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The places in the sequence of cp rank `rank`'s tokens: chunk rank, then chunk 2cp - 1 - rank.

    Made once per (seq_len, cp, rank, device) and shared: read it, do not write into it."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def split_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = -1) -> torch.Tensor:
    """This cp rank's tokens of `x` along `dim` (the sequence), in its order (`positions`)."""
    if cp == 1:
        return x
    return x.index_select(dim, positions(x.shape[dim], cp, rank, x.device))


# one block -------------------------------------------------------------------------------------
def _expand(kv: torch.Tensor, groups: int) -> torch.Tensor:
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _fold(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a grad over the query heads that shared one kv head."""
    if groups == 1:
        return grad
    b, h, s, d = grad.shape
    return grad.view(b, h // groups, groups, s, d).sum(2)


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    """q k^T x scale, with -inf above the diagonal when causal (by local index)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(),
                          float("-inf"))
    return s


def manual_block_forward(q, k, v, causal: bool, scale: float):
    """(out, lse) of q attending to one block k, v from its scores (fp32; causal: by local index)."""
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v), lse


def manual_block_backward(out_grad, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one block given the merged output and log-sum-exp of its query rows (fp32)."""
    p = torch.exp(_scores(q, k, causal, scale) - lse.unsqueeze(-1))
    delta = (out_grad * out).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), out_grad)
    ds = p * (torch.matmul(out_grad, v.transpose(-1, -2)) - delta)
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


def block_kernels(device: torch.device) -> tuple:
    """(forward, backward) for one block on `device`: the CPU flash kernel (it returns the log-sum-exp),
    else the block's math from its scores (on CUDA until the fused kernels' private entry points are wired)."""
    fused = cpu_flash_attention() if torch.device(device).type == "cpu" else None
    return fused or (manual_block_forward, manual_block_backward)


def merge(out, lse, rows, block_out, block_lse) -> None:
    """Fold a block's (out, lse) into the running (out, lse) on the query rows `rows`, in place."""
    old = lse[..., rows]
    new = torch.logaddexp(old, block_lse)
    out[..., rows, :] = (out[..., rows, :] * torch.exp(old - new).unsqueeze(-1)
                         + block_out * torch.exp(block_lse - new).unsqueeze(-1))
    lse[..., rows] = new


def ring_steps(cp: int, rank: int, local: int, causal: bool) -> List[Tuple[slice, slice, bool]]:
    """For each ring step (the block of rank - step): (query rows, key columns, causal) this rank computes.

    Step 0 is this rank's own block: its two chunks in sequence order, so the causal mask by
    position is the causal mask by local index."""
    everything = slice(0, local)
    if not causal:
        return [(everything, everything, False)] * cp
    half = local // 2
    steps = [(everything, everything, True)]
    for step in range(1, cp):
        source = (rank - step) % cp
        if source < rank:  # its first chunk precedes both of mine, its second follows both
            steps.append((everything, slice(0, half), False))
        else:  # both its chunks precede my second one and follow my first
            steps.append((slice(half, local), everything, False))
    return steps


# the ring ------------------------------------------------------------------------------------
def _exchange(send: torch.Tensor, next_rank: int, prev_rank: int, group) -> Tuple[torch.Tensor, list]:
    """Post the send of `send` to the next rank and the receive of the same shape from the previous one."""
    buffer = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, next_rank, group), dist.P2POp(dist.irecv, buffer, prev_rank, group)]
    return buffer, dist.batch_isend_irecv(ops)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, ring):
        with torch.autocast(q.device.type, enabled=False):  # fp32 blocks whatever autocast asks
            out, lse = _ring_forward(q, k, v, scale, causal, group, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.group, ctx.ring = scale, causal, group, ring
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, out_grad):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _ring_backward(q, k, v, out, lse, out_grad, ctx.scale, ctx.causal, ctx.group, ctx.ring)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _neighbours(ring: Sequence[int]) -> Tuple[int, int, int, int]:
    """(cp, this rank's place in the ring, the next rank, the previous rank)."""
    cp, rank = len(ring), list(ring).index(dist.get_rank())
    return cp, rank, ring[(rank + 1) % cp], ring[(rank - 1) % cp]


def _ring_blocks(q, k, v, causal, group, ring) -> Iterator[Tuple[slice, slice, bool, torch.Tensor, torch.Tensor]]:
    """Each ring step's (query rows, key columns, causal, keys, values), the keys and values in fp32 and
    repeated to the query heads. The send of the block held and the receive of the next are posted before
    the block is yielded, so the transfer runs while the caller computes; they are waited on when the
    caller asks for the next block."""
    cp, rank, next_rank, prev_rank = _neighbours(ring)
    groups = q.shape[1] // k.shape[1]
    kv = torch.stack([k, v]).contiguous()
    for step, (rows, cols, masked) in enumerate(ring_steps(cp, rank, q.shape[2], causal)):
        works = []
        if step < cp - 1:
            incoming, works = _exchange(kv, next_rank, prev_rank, group)
        key, value = (_expand(t[:, :, cols].float(), groups).contiguous() for t in kv)
        yield rows, cols, masked, key, value
        for work in works:
            work.wait()
        if step < cp - 1:
            kv = incoming


def _ring_forward(q, k, v, scale, causal, group, ring):
    """(out fp32, lse) of this rank's queries over every rank's keys: K/V go round, each block merged."""
    qf = q.float()
    out = torch.zeros_like(qf)
    lse = torch.full(qf.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    forward, _ = block_kernels(q.device)
    for rows, _, masked, key, value in _ring_blocks(q, k, v, causal, group, ring):
        block_out, block_lse = forward(qf[:, :, rows].contiguous(), key, value, masked, scale)
        merge(out, lse, rows, block_out, block_lse)
    return out, lse


def _ring_backward(q, k, v, out, lse, out_grad, scale, causal, group, ring):
    """(dq, dk, dv): K/V go round again with their grads beside them; one last hop brings each rank its own."""
    _, _, next_rank, prev_rank = _neighbours(ring)
    groups = q.shape[1] // k.shape[1]
    qf, dof = q.float(), out_grad.float()
    _, backward = block_kernels(q.device)
    dq = torch.zeros_like(qf)
    dkv = torch.zeros((2,) + tuple(k.shape), dtype=torch.float32, device=q.device)  # the grads of the block held
    grad_works: list = []
    sent_grads = None  # the grads being sent: alive until their send completes
    for rows, cols, masked, key, value in _ring_blocks(q, k, v, causal, group, ring):
        dq_rows, dk, dv = backward(dof[:, :, rows].contiguous(), qf[:, :, rows].contiguous(), key, value,
                                   out[:, :, rows].contiguous(), lse[..., rows].contiguous(), masked, scale)
        for work in grad_works:  # this block's grads so far, from the previous rank (arrived while computing)
            work.wait()
        dq[:, :, rows] += dq_rows
        dkv[0][:, :, cols] += _fold(dk, groups)
        dkv[1][:, :, cols] += _fold(dv, groups)
        sent_grads = dkv
        dkv, grad_works = _exchange(sent_grads, next_rank, prev_rank, group)  # to the next rank (the last: home)
    for work in grad_works:
        work.wait()
    del sent_grads
    return dq, dkv[0], dkv[1]


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                   group: Optional[dist.ProcessGroup], ring: Sequence[int]) -> torch.Tensor:
    """Attention over the whole sequence for this cp rank's queries: q [b, h, s/cp, d], k and v
    [b, h_kv, s/cp, d] (this rank's tokens, zigzag order); `ring` holds the cp group's global ranks."""
    return _RingAttention.apply(q, k, v, scale, causal, group, list(ring))


# Ulysses -------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Forward: scatter dim `split` over the group and gather dim `join`; backward: the inverse."""

    @staticmethod
    def forward(ctx, x, group, split, join):
        ctx.group, ctx.split, ctx.join = group, split, join
        return _all_to_all(x, group, split, join)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.join, ctx.split), None, None, None


def _all_to_all(x: torch.Tensor, group, split: int, join: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    pieces = [piece.contiguous() for piece in x.chunk(world, dim=split)]
    received = [torch.empty_like(piece) for piece in pieces]
    dist.all_to_all(received, pieces, group=group)
    return torch.cat(received, dim=join)


@functools.lru_cache(maxsize=16)
def _gathered_order(seq_len: int, cp: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the place in the sequence of each token gathered from the cp ranks in rank order, the permutation that
    puts them in sequence order), made once per shape."""
    order = torch.cat([positions(seq_len, cp, r, device) for r in range(cp)])
    return order, torch.argsort(order)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                      group: Optional[dist.ProcessGroup], cp: int, mask: Optional[Any] = None) -> torch.Tensor:
    """DeepSpeed-Ulysses: heads scattered and the sequence gathered (all-to-all), attention on the whole
    sequence in its natural order, then back. q, k, v as for `ring_attention`; `mask` (an AttentionMask:
    `mask.dense(s, device)` gives the booleans over the whole sequence in its natural order) in place of
    `causal`."""
    local = q.shape[2]
    gathered = [_AllToAll.apply(t, group, 1, 2) for t in (q, k, v)]  # [b, h/cp, s, d], ranks' tokens in rank order
    order, natural = _gathered_order(local * cp, cp, q.device)
    qn, kn, vn = (t.index_select(2, natural) for t in gathered)
    with torch.autocast(q.device.type, enabled=False):
        dense = mask.dense(local * cp, q.device) if mask is not None else None
        out = F.scaled_dot_product_attention(qn.float(), kn.float(), vn.float(), attn_mask=dense,
                                             is_causal=causal and mask is None, scale=scale,
                                             enable_gqa=qn.shape[1] != kn.shape[1])
    out = out.to(q.dtype).index_select(2, order)  # back to the ranks' order
    return _AllToAll.apply(out, group, 2, 1)


# what a plan installs in an attention module ----------------------------------------------------
class ContextAttend:
    """`attend(q, k, v, scale, enable_gqa, mask=None)` for a model's attention under cp > 1: causal attention
    over the whole sequence from this rank's zigzag share, by ring or Ulysses; chosen once, at parallelize.
    A mask (documents, a sliding window) is Ulysses' only (it sees the whole sequence; the ring's blocks
    would need their own masks): the config refuses both with the ring."""

    def __init__(self, group: Optional[dist.ProcessGroup], ring: Sequence[int], mode: str):
        self.group, self.ring, self.cp = group, list(ring), len(ring)
        self.run = self._ring if mode == "ring" else self._ulysses

    def __call__(self, q, k, v, scale: float, enable_gqa: bool, mask: Optional[Any] = None) -> torch.Tensor:
        return self.run(q, k, v, scale, mask)

    def _ring(self, q, k, v, scale, mask):
        if mask is not None:
            raise ValueError("ring attention takes no attention mask; use parallel.cp_mode=ulysses.")
        return ring_attention(q, k, v, scale=scale, causal=True, group=self.group, ring=self.ring)

    def _ulysses(self, q, k, v, scale, mask):
        return ulysses_attention(q, k, v, scale=scale, causal=True, group=self.group, cp=self.cp, mask=mask)


class ZigzagRows:
    """`rope_rows(s, device)` under cp > 1: the places of this rank's s tokens in a sequence of s x cp."""

    def __init__(self, cp: int, rank: int):
        self.cp, self.rank = cp, rank

    def __call__(self, s: int, device) -> torch.Tensor:
        return positions(s * self.cp, self.cp, self.rank, device)
