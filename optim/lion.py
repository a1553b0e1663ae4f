"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

One state tensor per parameter, `exp_avg` (the momentum m). For each step, with gradient g:

    c = beta1 * m + (1 - beta1) * g          # interpolate momentum and gradient
    p = p * (1 - lr * wd) - lr * sign(c)     # decoupled weight decay, then the sign step
    m = beta2 * m + (1 - beta2) * g          # then update the momentum with beta2

Every entry moves by exactly lr (plus decay), so Lion reads and writes 20 bytes per fp32
parameter (p, g, m in; p, m out) against AdamW's 28, and keeps half of AdamW's state.

The kernel is chosen once, at construction, and logged once:
- "triton": one Triton launch over every tensor of a group (`lion_triton.py`); the
  default on CUDA where Triton is installed (CPU: only under TRITON_INTERPRET=1, for tests).
- "compiled": a torch.compile'd single-pass kernel over each tensor, viewed 1-D (CPU via
  inductor's C++ backend, CUDA via Triton); the default wherever it compiles.
- "deepspeed": DeepSpeed's fused ops (CPU: the JIT-built C++ `cpu_lion` op, built lazily
  on first use, minutes the first time; CUDA: `FusedLion`'s multi-tensor kernel). Falls
  back to "compiled" with a log line when the op cannot be built or loaded.
- "foreach": torch's multi-tensor `_foreach_` ops; runs everywhere.

`step` relies only on each tensor's `.grad`, never on names or shapes, so it steps tp
shards and ZeRO-1's flat 1-D fp32 shards alike. Groups may carry `lr_mult`; the schedule
folds it into `lr` (see `optim.schedule.apply_lr`), so `step` reads `lr` only.
Keep parameters in fp32 (master weights): a bf16 weight rounds away Lion's fixed-size steps.
"""

import logging
from typing import Callable, Iterable, List, Optional, Tuple

import torch

from plait.common.compat import inductor_fma

log = logging.getLogger("plait")

IMPLS = ("auto", "triton", "compiled", "deepspeed", "foreach", "fused")


def foreach_lion(params: List[torch.Tensor], grads: List[torch.Tensor], moms: List[torch.Tensor],
                 lr: float, weight_decay: float, beta1: float, beta2: float) -> None:
    """The update with multi-tensor ops: three passes over the data, any device."""
    update = torch._foreach_mul(moms, beta1)
    torch._foreach_add_(update, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(update)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_mul_(moms, beta2)
    torch._foreach_add_(moms, grads, alpha=1.0 - beta2)


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x * y + z rounded once, as eager's `z.add_(x, alpha=y)` computes it on CPU and CUDA."""
    fma = inductor_fma()
    if fma is not None:
        return fma(x, y, z)
    return (x.double() * y.double() + z.double()).to(z.dtype)  # older inductor: sum in fp64, round once


def _lion_single_pass(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, neg_lr: torch.Tensor,
                      decay: torch.Tensor, beta1: torch.Tensor, one_minus_beta1: torch.Tensor,
                      beta2: torch.Tensor, one_minus_beta2: torch.Tensor) -> None:
    """The whole update on one 1-D tensor; compiled, it reads p, g, m once and writes p, m once.

    The momentum sums use a fused multiply-add, as eager's `add_(g, alpha=)` does, so the
    compiled kernel matches the eager rule bit for bit; `sign * -lr` is exact, so the
    parameter update needs no such care.
    """
    update = torch.sign(_fma(g, one_minus_beta1, m * beta1))
    p.copy_(p * decay + update * neg_lr)
    m.copy_(_fma(g, one_minus_beta2, m * beta2))


class CompiledLion:
    """Calls one compiled kernel per tensor (dynamic shapes: one compilation for all sizes).

    Hyper-parameters travel as 0-d fp32 tensors on the parameters' device, so a schedule
    that changes lr every step does not recompile.
    """

    _compiled: Optional[Callable] = None  # one compilation per process, shared by every optimizer

    def __init__(self, device: torch.device):
        self.device = device
        if CompiledLion._compiled is None:
            CompiledLion._compiled = torch.compile(_lion_single_pass, dynamic=True, fullgraph=True)
        self.kernel = CompiledLion._compiled

    def __call__(self, params, grads, moms, lr, weight_decay, beta1, beta2) -> None:
        numbers = (-lr, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2)
        scalars = [torch.tensor(x, dtype=torch.float32, device=params[0].device) for x in numbers]
        for p, g, m in zip(params, grads, moms):
            self.kernel(p.view(-1), g.reshape(-1), m.view(-1), *scalars)


class DeepSpeedCPULionKernel:
    """DeepSpeed's C++ `cpu_lion` op (AVX), one call per tensor; CPU fp32 tensors only."""

    _next_id = 0

    def __init__(self):
        from deepspeed.ops.op_builder import CPULionBuilder

        self.op = CPULionBuilder().load()
        self.opt_id = DeepSpeedCPULionKernel._next_id
        DeepSpeedCPULionKernel._next_id += 1
        self.op.create_lion(self.opt_id, 1e-4, 0.9, 0.99, 0.0, False)
        self.steps = 0

    def __call__(self, params, grads, moms, lr, weight_decay, beta1, beta2) -> None:
        self.steps += 1
        for p, g, m in zip(params, grads, moms):
            self.op.lion_update(self.opt_id, self.steps, lr, beta1, beta2, weight_decay, p, g.contiguous(), m)


class DeepSpeedFusedLionKernel:
    """DeepSpeed's CUDA multi-tensor Lion kernel (`FusedLion`'s op)."""

    def __init__(self):
        from deepspeed.ops.op_builder import FusedLionBuilder

        from deepspeed.ops.lion.multi_tensor_apply import MultiTensorApply

        self.op = FusedLionBuilder().load()
        self.apply = MultiTensorApply(2048 * 32)
        self.overflow = None
        self.steps = 0

    def __call__(self, params, grads, moms, lr, weight_decay, beta1, beta2) -> None:
        if self.overflow is None:
            self.overflow = torch.zeros(1, dtype=torch.int, device=params[0].device)
        self.steps += 1
        self.apply(self.op.multi_tensor_lion, self.overflow, [grads, params, moms],
                   lr, beta1, beta2, self.steps, weight_decay)


def _compiled_kernel(device: torch.device) -> Optional[CompiledLion]:
    """The compiled kernel if torch.compile can build it here (a C++ compiler on CPU, Triton on CUDA)."""
    try:
        kernel = CompiledLion(device)
        p, g, m = (torch.ones(8, device=device) for _ in range(3))
        kernel([p], [g], [m], 0.1, 0.0, 0.9, 0.99)
        if torch.equal(p, torch.full_like(p, 0.9)):
            return kernel
        log.info("lion: the compiled kernel gave a wrong probe result")
    except Exception as error:  # any backend failure means: use another kernel
        log.info("lion: torch.compile kernel unavailable (%s)", str(error).splitlines()[0][:200])
    return None


def _triton_kernel() -> Optional[Callable]:
    """The multi-tensor Triton kernel, or None (logged) where Triton cannot run it."""
    from plait.optim.lion_triton import TritonLion

    try:
        return TritonLion(fallback=foreach_lion)
    except Exception as error:  # not installed, no device, or a backend that fails to build
        log.info("lion: Triton kernel unavailable (%s)", str(error).splitlines()[0][:200])
    return None


def choose_kernel(impl: str, device: torch.device) -> Tuple[str, Callable]:
    """The kernel for `impl` on `device`, with fallbacks; returns (name, kernel).

    auto: Triton's multi-tensor kernel on CUDA, the compiled per-tensor kernel on CPU (or
    where Triton is missing), the foreach rule where nothing compiles. "fused" is an alias
    of auto. A kernel asked for by name that cannot run here says so and falls back.
    """
    if impl not in IMPLS:
        raise ValueError(f"optim.impl={impl} is not one of {', '.join(IMPLS)}; pick one of those for Lion.")
    if impl == "deepspeed":
        try:
            kernel = DeepSpeedFusedLionKernel() if device.type == "cuda" else DeepSpeedCPULionKernel()
            return "deepspeed", kernel
        except Exception as error:
            log.info("lion: DeepSpeed op unavailable (%s); falling back", str(error).splitlines()[0][:200])
            impl = "auto"
    if impl == "triton" or (impl in ("auto", "fused") and device.type == "cuda"):
        kernel = _triton_kernel()
        if kernel is not None:
            return "triton", kernel
    kernel = _compiled_kernel(device) if impl != "foreach" else None
    if kernel is not None:
        return "compiled", kernel
    if impl != "foreach":
        log.info("lion: falling back to the foreach kernel")
    return "foreach", foreach_lion


class Lion(torch.optim.Optimizer):
    """Lion over parameter groups (`lr`, `betas`, `weight_decay`, optional `lr_mult`)."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, impl: str = "auto", device: Optional[torch.device] = None):
        if lr < 0.0:
            raise ValueError(f"optim.lr={lr} must be >= 0.")
        if not all(0.0 <= beta <= 1.0 for beta in betas):
            raise ValueError(f"optim.betas={list(betas)} must lie in [0, 1].")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        if device is None:
            device = next((p.device for group in self.param_groups for p in group["params"]), torch.device("cpu"))
        self.impl, self._kernel = choose_kernel(impl, torch.device(device))
        log.info("optimizer: Lion (%s) on %s", self.impl, torch.device(device).type)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, moms = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                params.append(p)
                grads.append(p.grad)
                moms.append(state["exp_avg"])
            if params:
                beta1, beta2 = group["betas"]
                self._kernel(params, grads, moms, group["lr"], group["weight_decay"], beta1, beta2)
        return loss
