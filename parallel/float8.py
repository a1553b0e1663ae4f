"""Float8 GEMMs for the transformer's linear layers (`train.precision=fp8`), scaled per tensor.

The recipe is torchao's "tensorwise" one (Transformer Engine's "hybrid" format with current scaling):

- forward: the input x and the weight W are each cast to e4m3 (3 mantissa bits, largest 448) with one
  scale per tensor, 448 / amax(|t|); y = _scaled_mm(xq, Wq^T) times both inverse scales, in autocast's dtype
  (bf16), with fast accumulation as torchao does for the output GEMM;
- backward: the output grad g is cast the same way to e5m2 (2 mantissa bits, largest 57344: range before
  precision); grad_x = g W from (gq, Wq) in x's dtype and grad_W = g^T x from (gq, xq) in W's (fp32, the master
  weight's), each accumulated in fp32;
- saved for the backward: xq and Wq, one byte an element where a bf16 linear keeps x in two.

The layers in float8 are attention's Q|K|V and output projections, the MLP's gate|up and down, and in a mixture of
experts each expert's and the shared expert's. What stays out: the embedding, the head (its logits feed the loss;
torchtitan leaves it out by default for the same reason), the routers and the shared expert's gate (readouts of a
few columns), attention's score and value products, norms.

Scales across ranks. A scale belongs to one whole tensor of this rank's tokens. A tensor split along its
features over tp (a column-parallel layer's weight and output grad, a row-parallel layer's weight and input)
takes the max of its amax over the tp group, so each rank casts with the scale one process would and tp gives
one process's numbers. A split along tokens (micro-batches, dp, cp) is not reduced: each micro-batch is its own
tensor, as under gradient accumulation.

On CUDA `_scaled_mm` runs on float8 tensor cores (compute capability 8.9+) and needs the GEMMs' sizes to be
multiples of 16. The layers' widths are checked by train/config.py on every device, so a config tried on CPU
(where the GEMMs are emulated) runs on the GPU too. The token count varies (an expert gets what the router sends
it, none at times), so the rows are padded with zeros to a multiple of 16: a zero row adds nothing to the
weight grad, and its output rows are dropped.
"""

import fnmatch
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.common.checks import SettingError
from plait.common.compat import scaled_mm
from plait.common.precision import autocast_dtype
from plait.parallel.grid import Grid
from plait.parallel.tensor import ColumnParallelLinear, RowParallelLinear

FORWARD_DTYPE = torch.float8_e4m3fn  # x and W
GRAD_DTYPE = torch.float8_e5m2       # the output grad
_TINY = 1e-12                        # an all-zero tensor casts to zeros instead of dividing by zero

ROW_MULTIPLE = 16  # CUDA's float8 GEMM takes sizes in multiples of 16: the token rows are padded to one

# the layers that run float8 GEMMs: attention's fused QKV (latent attention's query and key-value up projections) and
# output, the MLP's gate|up and down, each expert's
_BLOCK_LINEARS = ("attn.wqkv", "attn.wq", "attn.wq_b", "attn.wkv_b", "attn.wo", "mlp.w13", "mlp.w2",
                  "mlp.experts.*.w13", "mlp.experts.*.w2", "mlp.shared.w13", "mlp.shared.w2")
FLOAT8_LAYERS = tuple(blocks + name for blocks in ("layers.*.", "mtp.layers.*.block.") for name in _BLOCK_LINEARS)


def to_float8(t: torch.Tensor, dtype: torch.dtype, group=None):
    """`t` cast to float8 `dtype` with one scale, and the inverse of that scale (fp32, a scalar on t's device).

    The scale maps amax(|t|) (the max over `group` when t is one shard of a tensor split over it) to the
    format's largest value."""
    amax = t.detach().abs().amax().float()
    if group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    largest = torch.finfo(dtype).max
    scale = largest / amax.clamp(min=_TINY)
    cast = (t.detach().float() * scale).clamp(-largest, largest).to(dtype)
    return cast, scale.reciprocal()


def emulated_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                       out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """`scaled_mm`'s numbers off CUDA: the float8 operands widened to fp32 (exactly), multiplied and accumulated
    in fp32 (autocast off: it would multiply in bf16), scaled, then rounded once to `out_dtype`. torch's CPU
    `_scaled_mm` gives the same but takes 0.5 s for an e4m3 x e4m3 GEMM of 256 x 64 x 192 (its e5m2 GEMMs take
    0.3 ms)."""
    with torch.autocast(a.device.type, enabled=False):
        return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as rows [n, features], with zero rows added up to a multiple of ROW_MULTIPLE (at least one multiple)."""
    rows = t.reshape(-1, t.shape[-1])
    count = rows.shape[0]
    padded = max(ROW_MULTIPLE, -(-count // ROW_MULTIPLE) * ROW_MULTIPLE)
    return rows if padded == count else F.pad(rows, (0, 0, 0, padded - count))


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column by column (`_scaled_mm`'s second operand)."""
    return t.t().contiguous().t()


class _Float8Linear(torch.autograd.Function):
    """forward: x W^T from e4m3 casts of both; backward: both grads from an e5m2 cast of the output grad."""

    @staticmethod
    def forward(ctx, x, weight, gemm: "Float8Gemm", out_dtype: torch.dtype):
        xq, x_inverse = to_float8(_padded_rows(x), FORWARD_DTYPE, gemm.input_group)
        wq, w_inverse = to_float8(weight, FORWARD_DTYPE, gemm.weight_group)
        out = gemm.matmul(xq, wq.t(), x_inverse, w_inverse, out_dtype, fast_accum=True)
        ctx.save_for_backward(xq, x_inverse, wq, w_inverse)
        ctx.gemm, ctx.x_dtype, ctx.w_dtype = gemm, x.dtype, weight.dtype
        rows = x.shape[:-1].numel()
        return out[:rows].view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xq, x_inverse, wq, w_inverse = ctx.saved_tensors
        gq, g_inverse = to_float8(_padded_rows(grad), GRAD_DTYPE, ctx.gemm.grad_group)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.gemm.matmul(gq, _column_major(wq), g_inverse, w_inverse, ctx.x_dtype)
            grad_x = grad_x[:grad.shape[:-1].numel()].view(*grad.shape[:-1], grad_x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = ctx.gemm.matmul(gq.t().contiguous(), _column_major(xq), g_inverse, x_inverse, ctx.w_dtype)
        return grad_x, grad_w, None, None


class Float8Gemm:
    """`F.linear(x, weight, bias)` with float8 GEMMs. The groups are those a shard's amax is shared over (None:
    the tensor is whole on this rank): the weight's, the input's and the output grad's. `device_type` picks the
    GEMM once: `_scaled_mm` on CUDA's float8 tensor cores, its fp32 emulation elsewhere."""

    def __init__(self, weight_group=None, input_group=None, grad_group=None, device_type: str = "cpu"):
        self.weight_group, self.input_group, self.grad_group = weight_group, input_group, grad_group
        self.matmul = scaled_mm if device_type == "cuda" else emulated_scaled_mm

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = _Float8Linear.apply(x, weight, self, autocast_dtype(x.device.type) or x.dtype)
        return y if bias is None else y + bias.to(y.dtype)


class Float8Error(SettingError):
    """A device that cannot run float8 GEMMs, in one sentence."""


FLOAT8_CAPABILITY = (8, 9)  # Ada and Hopper on: L4, L40S, H100, H200, B200


def check_float8_device(device: torch.device) -> None:
    """Refuse a CUDA device without float8 tensor cores, in one sentence (the CPU emulates the GEMMs)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_CAPABILITY:
        raise Float8Error(f"train.precision=fp8 needs float8 tensor cores (compute capability 8.9 or newer: L4, "
                          f"L40S, H100, H200, B200), but {torch.cuda.get_device_name(device)} has "
                          f"{capability[0]}.{capability[1]}; use train.precision=bf16.")


def float8_gemm_for(module: nn.Module, grid: Grid) -> Callable:
    """The float8 GEMM of a column- or row-parallel layer, its shards' amax shared over tp."""
    group, device_type = grid.tp_group if grid.tp > 1 else None, module.weight.device.type
    if isinstance(module, ColumnParallelLinear):  # W split by rows, x whole, y (and its grad) split
        return Float8Gemm(weight_group=group, grad_group=group, device_type=device_type)
    if isinstance(module, RowParallelLinear):  # W and x split by columns, y whole after the reduction
        return Float8Gemm(weight_group=group, input_group=group, device_type=device_type)
    raise TypeError(f"{type(module).__name__} has no float8 GEMM: only column- and row-parallel layers do.")


def use_float8(model: nn.Module, grid: Grid) -> int:
    """Give `model`'s linear layers named in FLOAT8_LAYERS (after `parallelize`, on the device they will run on:
    it picks the GEMM) float8 GEMMs; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in FLOAT8_LAYERS):
            module.use_gemm(float8_gemm_for(module, grid))
            count += 1
    return count
