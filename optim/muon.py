"""Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") for the hidden
matrices, AdamW for everything else, in one optimizer.

For each hidden matrix W (A x B) with gradient G, momentum mu, momentum buffer M:

    M = mu * M + (1 - mu) * G                       # torch.optim.Muon's momentum (a lerp)
    U = (1 - mu) * G + mu * M                       # Nesterov's look-ahead (without it: U = M)
    O = NS(U)                                       # Newton-Schulz: roughly U's nearest semi-orthogonal matrix
    W = W * (1 - lr * wd) - lr * r(A, B) * O        # decoupled weight decay, then the orthogonal step

r(A, B) = 0.2 sqrt(max(A, B)) ("match_rms_adamw", Moonlight's: the step's RMS matches AdamW's,
so AdamW's learning rate and weight decay carry over; plait's default, since one `optim.lr`
and one schedule drive both parts) or sqrt(max(1, A / B)) ("original", Keller Jordan's, which
wants a learning rate near 0.02). NS runs in bf16 by default, as torch's and the reference do.
Embeddings, the head and norm gains step with AdamW: torch's own functional kernel (fused where
the device has one), its state made and placed as torch.optim.AdamW makes it.

Everything above is elementwise except NS, which needs whole matrices. A matrix layout says how
this rank's tensors (whole parameters, tp shards, ZeRO pieces) make whole matrices: its
`orthogonalize(pieces, fn, scale)` gathers them, applies `fn` to each logical matrix (Q, K and V of a
fused weight each on its own, as a model with separate projections has them) and hands back this
rank's piece of each result, in parts that each carry their matrix's scale (so the step adds the
bf16 result with alpha = -lr r(A, B), as torch.optim.Muon does). `WholeMatrices` (the default)
takes each tensor as one matrix: torch.optim.Muon's rule; `plait.parallel.matrices.ShardedMatrices`
does it under tp x dp x ZeRO.
"""

import math
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Tuple

import torch
from torch.optim.adam import adam

from plait.common.matrix_parts import Orthogonalize, Part, Pieces, Scale

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's (a, b, c), Keller Jordan's
# optim.muon_adjust_lr -> the step's scale for an A x B matrix
ADJUSTMENTS: Dict[str, Callable[[int, int], float]] = {
    "match_rms_adamw": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
    "original": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),
}
# optim.muon_ns_dtype -> the dtype Newton-Schulz iterates in
NS_DTYPES: Dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}



def newton_schulz(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  eps: float = 1e-7) -> torch.Tensor:
    """`steps` quintic Newton-Schulz iterations on `matrix` scaled to Frobenius norm 1 (so its spectral norm is
    at most 1), in `dtype`, on the wide orientation (X X^T is the smaller Gram matrix)."""
    x = matrix.to(dtype)
    converted = x is not matrix  # a copy of its own: scaled in place; the caller's matrix never is
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = x.norm().clamp(min=eps)
    x = x.div_(norm) if converted else x / norm
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MatrixLayout(Protocol):
    """Where whole matrices come from: `orthogonalize(pieces, fn, scale)` returns, for each name, the parts of this
    rank's piece of fn's results (a fused weight's segments are separate matrices), each with scale(its shape)."""

    def orthogonalize(self, pieces: Pieces, fn: Orthogonalize, scale: Scale) -> Dict[str, List[Part]]:
        ...


class WholeMatrices:
    """The layout of a single process with plain parameters: each tensor is one whole matrix."""

    def orthogonalize(self, pieces: Pieces, fn: Orthogonalize, scale: Scale) -> Dict[str, List[Part]]:
        for name, (update, _) in pieces.items():
            if update.ndim != 2:
                raise ValueError(f"Muon steps matrices; {name} has shape {tuple(update.shape)} (optimize it with "
                                 "AdamW, or give Muon the layout its pieces come from).")
        return {name: [(0, fn(update), scale(*update.shape))] for name, (update, _) in pieces.items()}


class Muon(torch.optim.Optimizer):
    """Muon over the groups marked `muon: True`, AdamW over the others (see the module's docstring).

    Groups may carry `names` (parameter names, which the layout reads) and `offsets` (where each tensor starts
    in its flattened local parameter: ZeRO's pieces); without them, tensors are numbered and whole.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: str = "bfloat16", adjust_lr: str = "match_rms_adamw",
                 matrices: Optional[MatrixLayout] = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, muon=False)
        super().__init__(params, defaults)
        self.ns_steps, self.ns_dtype, self.ratio = ns_steps, NS_DTYPES[ns_dtype], ADJUSTMENTS[adjust_lr]
        self.matrices = matrices if matrices is not None else WholeMatrices()
        for group in self.param_groups:  # AdamW's part: torch's fused kernel where every tensor's device has one
            if not group["muon"]:
                group.setdefault("fused", all(p.device.type in ("cpu", "cuda") for p in group["params"]))

    def _orthogonal(self, matrix: torch.Tensor) -> torch.Tensor:
        """NS(matrix) in the iteration's dtype (the step adds it with alpha -lr r(A, B), as torch.optim.Muon does)."""
        return newton_schulz(matrix, self.ns_steps, self.ns_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pieces: Pieces = {}
        stepped: Dict[str, Tuple[torch.Tensor, Dict]] = {}
        for index, group in enumerate(self.param_groups):
            if not group["muon"]:
                self._adamw(group)
                continue
            names = group.get("names") or [f"{index}.{i}" for i in range(len(group["params"]))]
            offsets = group.get("offsets") or [0] * len(names)
            for name, offset, param in zip(names, offsets, group["params"]):
                if param.grad is not None:
                    pieces[name] = (self._momentum(param, group), offset)
                    stepped[name] = (param, group)
        # every rank calls this each step, with pieces or none: under tp and ZeRO it is a collective
        orthogonal = self.matrices.orthogonalize(pieces, self._orthogonal, self.ratio)
        for name, (param, group) in stepped.items():
            param.mul_(1.0 - group["lr"] * group["weight_decay"])
            for offset, values, scale in orthogonal[name]:  # a part: the piece's values from `offset` on
                target = param.view(-1).narrow(0, offset, values.numel()).view(values.shape)
                target.add_(values, alpha=-(group["lr"] * scale))
        return loss

    def _momentum(self, param: torch.Tensor, group: Dict) -> torch.Tensor:
        """Update the momentum buffer; returns the tensor to orthogonalize (Nesterov's look-ahead, or the buffer)."""
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
        buffer, mu = state["momentum_buffer"], group["momentum"]
        buffer.lerp_(param.grad, 1.0 - mu)
        return param.grad.lerp(buffer, mu) if group["nesterov"] else buffer

    def _adamw(self, group: Dict) -> None:
        """torch's AdamW step over the group's tensors with grads (state as torch.optim.AdamW makes it)."""
        params: List[torch.Tensor] = [p for p in group["params"] if p.grad is not None]
        for param in params:
            state = self.state[param]
            if not state:  # fused: `step` on the parameter's device; otherwise on the CPU (torch's placement)
                state["step"] = (torch.zeros((), dtype=torch.float32, device=param.device) if group["fused"]
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if not params:
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
             [s["step"] for s in states], foreach=None if group["fused"] else True, fused=group["fused"] or None,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def muon_group_of(group_of: Callable, is_matrix: Callable[[str], bool], lr_mult: float = 1.0) -> Callable:
    """`group_of(name, param)` for `plait.optim.groups.param_groups` that puts the names `is_matrix` picks in
    one Muon group (decayed; `lr_mult` times the schedule's lr: `optim.muon_lr / optim.lr`) and leaves every other
    name where `group_of` puts it."""

    def muon_or_other(name, param) -> Dict:
        if is_matrix(name):
            return {"group": "muon", "lr_mult": lr_mult, "wd_mult": 1.0, "muon": True}
        return group_of(name, param)

    return muon_or_other
