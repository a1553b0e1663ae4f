"""muP, the maximal-update parametrization (Yang & Hu, Tensor Programs IV and V).

Every parameter gets a role from its full, unsharded shape, compared with the same
parameter in a base-width model and a wider "delta" model (as `mup.set_base_shapes`
does): a dimension that differs between base and delta grows with width ("infinite").

| role   | which                                  | init std        | lr (Adam, Lion) | coupled wd |
| ------ | -------------------------------------- | --------------- | --------------- | ---------- |
| input  | one infinite dim (embedding)           | sigma           | lr              | wd         |
| hidden | two infinite dims (q, k, v, o, MLP)    | sigma/sqrt(m)   | lr / m          | wd * m     |
| output | the readouts, named by the caller      | sigma, or 0     | lr              | wd         |
| vector | 1-D (norm gains, biases) or no inf dim | as usual        | lr              | none       |

m is the parameter's width multiplier: its fan-in (the last infinite dim) over the base
model's. Weight decay is scaled by m on hidden matrices so that lr x wd, the shrink per
step of decoupled decay (AdamW, Lion), stays width-independent. The forward multipliers
are in `forward_scales`: logits x output_mult / m_readout, embeddings x input_mult,
attention logits x attn_mult * sqrt(base_head_dim) / head_dim (1/d_head, equal to the
standard 1/sqrt(d_head) at the base width), and a mixture of experts' router logits and
shared-expert gate x 1 / m_router. Those are readouts too (fan-in grows, fan-out is the
fixed number of experts): without the 1/m, one update moves each router logit by Theta(m)
and the routing saturates as width grows.

With `enabled=False` the same table gives the standard parametrization: every
multiplier is 1 (vectors still do not decay), so muP on and off share one code path.
The table is keyed by global parameter name and built from plain shapes, never from
attributes on tensors, so it survives tp sharding, pipeline chunks, deepcopy,
state_dict, torch.compile and ZeRO's flat shards. This module takes numbers only; the
trainer (`plait.train.parametrization`) supplies the shapes from the model.
"""

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

Shape = Tuple[int, ...]
ROLES = ("input", "hidden", "output", "vector")


class MupError(ValueError):
    """A base/delta shape table that does not describe the model."""


@dataclass(frozen=True)
class MupRole:
    """One parameter's class and its multipliers (relative to the standard parametrization)."""

    role: str
    width_mult: float  # fan-in over the base model's fan-in (1 when nothing grows)
    init_mult: float  # times the standard init std
    lr_mult: float  # times the base learning rate
    wd_mult: float  # times the configured weight decay

    @property
    def group(self) -> str:
        """The optimizer group: one per (role, multipliers)."""
        return self.role if self.lr_mult == 1.0 and self.wd_mult in (0.0, 1.0) else f"{self.role}@{self.width_mult:g}"


def infinite_dims(base: Shape, delta: Shape) -> Tuple[int, ...]:
    """Indices of the dimensions that grow with width (differ between base and delta)."""
    if len(base) != len(delta):
        raise MupError(f"base shape {base} and delta shape {delta} differ in rank")
    return tuple(i for i, (b, d) in enumerate(zip(base, delta)) if b != d)


def classify(name: str, full: Shape, base: Shape, delta: Shape, readout: Iterable[str]) -> Tuple[str, float]:
    """(role, width multiplier) of one parameter from its full, base and delta shapes."""
    grows = infinite_dims(base, delta)
    if len(grows) > 2:
        raise MupError(f"{name} has {len(grows)} dimensions that grow with width; muP handles at most 2")
    width_mult = full[grows[-1]] / base[grows[-1]] if grows else 1.0
    if name in set(readout):
        return "output", width_mult
    if len(grows) == 2:
        return "hidden", width_mult
    if len(full) >= 2 and grows:
        return "input", width_mult
    return "vector", width_mult


def role_of(role: str, width_mult: float, enabled: bool = True) -> MupRole:
    """The multipliers muP gives a role (all 1 under the standard parametrization)."""
    decays = 0.0 if role == "vector" else 1.0
    if not enabled or role != "hidden":
        return MupRole(role, width_mult if enabled else 1.0, 1.0, 1.0, decays)
    return MupRole(role, width_mult, 1.0 / math.sqrt(width_mult), 1.0 / width_mult, width_mult)


def mup_table(full_shapes: Dict[str, Shape], base_shapes: Dict[str, Shape], delta_shapes: Dict[str, Shape],
              readout: Sequence[str], enabled: bool = True) -> Dict[str, MupRole]:
    """{global parameter name: MupRole} for every name in `full_shapes`."""
    table = {}
    for name, full in full_shapes.items():
        if name not in base_shapes or name not in delta_shapes:
            raise MupError(f"{name} is missing from the base or delta model; build them from the same config")
        role, width_mult = classify(name, tuple(full), tuple(base_shapes[name]), tuple(delta_shapes[name]), readout)
        table[name] = role_of(role, width_mult, enabled)
    return table


def group_key(table: Dict[str, MupRole]):
    """The `group_of(name, param)` that `plait.optim.groups.param_groups` takes."""

    def group_of(name, param) -> Dict:
        entry = table[name]
        return {"group": entry.group, "lr_mult": entry.lr_mult, "wd_mult": entry.wd_mult}

    return group_of


@dataclass(frozen=True)
class ForwardScales:
    """Plain numbers for the model's forward multipliers (None: the model's default)."""

    embedding: float = 1.0
    logits: float = 1.0
    attention: Optional[float] = None
    router: float = 1.0


def forward_scales(readout_width_mult: float, head_dim: int, base_head_dim: int, input_mult: float = 1.0,
                   output_mult: float = 1.0, attn_mult: float = 1.0, enabled: bool = True,
                   router_width_mult: float = 1.0) -> ForwardScales:
    """muP's embedding, logit, attention and router multipliers; all defaults under the standard parametrization."""
    if not enabled:
        return ForwardScales()
    return ForwardScales(embedding=input_mult, logits=output_mult / readout_width_mult,
                         attention=attn_mult * math.sqrt(base_head_dim) / head_dim, router=1.0 / router_width_mult)
