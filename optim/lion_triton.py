"""Lion as one Triton launch over many tensors (a multi-tensor kernel, as torch's fused AdamW is).

What moves: each program reads one block of BLOCK elements of one tensor (p, g and m:
12 bytes an element) and writes p and m back (8 bytes): Lion's 20-byte floor, read and
written once, for every tensor of a param group in a single launch. The tensors are
found through tables built on the host and cached while the tensors stay where they are:

    addresses[3, T]  int64  data pointers of p, g, m for each of the T tensors
    numels[T]        int64  elements of each tensor
    block_tensor[N]  int32  which tensor block n belongs to
    block_start[N]   int64  where block n starts inside it

The arithmetic is the eager rule's, rounding for rounding (`foreach_lion`): the momentum
interpolations are fused multiply-adds as eager's `add_(g, alpha=)` computes them, the
decay product is rounded on its own before the sign step is added (contraction of that
pair is switched off with `enable_fp_fusion=False`), and sign is torch's (0 < c) - (c < 0),
which is 0 for NaN. So the
kernel equals the eager rule bit for bit on CUDA, and under `TRITON_INTERPRET=1` on CPU
tensors, which is how CI tests it without a GPU.

Only fp32, contiguous p, g and m go through the kernel (master weights; plait's grads
are views into flat fp32 buffers); any other group steps with the foreach rule.
"""

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

BLOCK = 4096
NUM_WARPS = 8
ALIGN_BYTES = 16  # vector loads need every base address 16-byte aligned (told to the compiler when true)

_KERNELS: Dict[bool, Callable] = {}  # the jitted kernel, per interpreter mode (TRITON_INTERPRET is read at jit time)


def triton_available() -> Optional[str]:
    """None when Triton can run this kernel here, else why not (one line)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU, slowly)"
    return None


def _kernel() -> Callable:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret not in _KERNELS:
        _KERNELS[interpret] = _build_kernel()
    return _KERNELS[interpret]


def _build_kernel() -> Callable:
    import triton
    import triton.language as tl

    @triton.jit
    def lion_multi_tensor(addresses, numels, block_tensor, block_start, n_tensors, neg_lr, decay, beta1,
                          one_minus_beta1, beta2, one_minus_beta2, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        block = tl.program_id(0)
        tensor = tl.load(block_tensor + block)
        start = tl.multiple_of(tl.load(block_start + block), BLOCK)
        numel = tl.load(numels + tensor)
        p_ptr = tl.load(addresses + tensor).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(addresses + n_tensors + tensor).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(addresses + 2 * n_tensors + tensor).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
        offsets = tl.max_contiguous(start + tl.arange(0, BLOCK), BLOCK)
        mask = offsets < numel
        p = tl.load(p_ptr + offsets, mask=mask)
        g = tl.load(g_ptr + offsets, mask=mask)
        m = tl.load(m_ptr + offsets, mask=mask)
        c = tl.fma(g, one_minus_beta1, m * beta1)
        sign = tl.where(c > 0, 1.0, 0.0) - tl.where(c < 0, 1.0, 0.0)  # torch.sign's (0 < c) - (c < 0)
        p = p * decay + sign * neg_lr
        m = tl.fma(g, one_minus_beta2, m * beta2)
        tl.store(p_ptr + offsets, p, mask=mask)
        tl.store(m_ptr + offsets, m, mask=mask)

    return lion_multi_tensor


class _Tables:
    """The device-side tables of one group's tensors (see the module docstring)."""

    def __init__(self, params, grads, moms, device: torch.device):
        numels = [p.numel() for p in params]
        addresses = [t.data_ptr() for group in (params, grads, moms) for t in group]
        tensor_ids, starts = [], []
        for index, numel in enumerate(numels):
            blocks = -(-numel // BLOCK)
            tensor_ids += [index] * blocks
            starts += range(0, blocks * BLOCK, BLOCK)
        self.n_tensors, self.n_blocks = len(params), len(tensor_ids)
        self.aligned = all(address % ALIGN_BYTES == 0 for address in addresses)
        self.addresses = torch.tensor(addresses, dtype=torch.int64, device=device)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=device)
        self.block_tensor = torch.tensor(tensor_ids, dtype=torch.int32, device=device)
        self.block_start = torch.tensor(starts, dtype=torch.int64, device=device)


def _fits(tensors: List[torch.Tensor]) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


class TritonLion:
    """The Lion kernel call `(params, grads, moms, lr, weight_decay, beta1, beta2)`: one launch per call.

    Tables are cached by the tensors' addresses and sizes, so a step over the same
    tensors (every step after the first) builds nothing on the host.
    """

    def __init__(self, fallback: Callable):
        reason = triton_available()
        if reason is not None:
            raise RuntimeError(reason)
        self.kernel = _kernel()
        self.fallback = fallback
        self._tables: Dict[Tuple, _Tables] = {}

    def _tables_for(self, params, grads, moms) -> _Tables:
        key = tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), p.numel()) for p, g, m in zip(params, grads, moms))
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) > 64:  # tensors moved many times (e.g. re-created each step): do not grow forever
                self._tables.clear()
            tables = self._tables[key] = _Tables(params, grads, moms, params[0].device)
        return tables

    def __call__(self, params, grads, moms, lr, weight_decay, beta1, beta2) -> None:
        if not (_fits(params) and _fits(grads) and _fits(moms)):
            self.fallback(params, grads, moms, lr, weight_decay, beta1, beta2)
            return
        tables = self._tables_for(params, grads, moms)
        if tables.n_blocks == 0:
            return
        self.kernel[(tables.n_blocks,)](
            tables.addresses, tables.numels, tables.block_tensor, tables.block_start, tables.n_tensors,
            -lr, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
            ALIGNED=tables.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
