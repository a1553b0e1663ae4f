"""The layout: how `world_size` ranks split over named dimensions, and every rule a layout must obey.

Dimensions, outermost first: `pp`, `dp`, `cp`, `tp` (Megatron's order): a rank's number is
`tp + tp * (cp + cp * (dp + dp * pp))`, so tensor-parallel groups, the chattiest, stay inside
a node, context-parallel peers next to them, and cheap point-to-point pipeline traffic
crosses nodes. `Layout` is arithmetic only (no process groups), so plans and error checks
work for any world size before anything is initialized; `plait.parallel.grid.Grid` builds
this rank's groups from it.

`validate(parallel, world_size, workload)` holds every rule a layout must obey, each with one
sentence naming the setting and the fix: degrees, the world size, what tp must divide (heads,
kv heads, the MLP width), sequence parallelism's sequence split, the pipeline's layer split and
micro-batch counts, the batch split over dp and micro-batches. `plait-train`, `plait-launch`,
`plait plan`, `load_config` and the loader all call it (or the one function of it they need),
so one bad layout reads the same everywhere.

Adding a dimension: name it in `DIMS` (and a field below), give its rules in `validate`;
then the strand that uses it reads `grid.group(name)`.
"""

from dataclasses import dataclass
from itertools import product
from typing import Any, Dict, List, Optional

from plait.common.checks import SettingError, choice, number

DIMS = ("pp", "dp", "cp", "tp")  # outermost to innermost
COMBOS = {"mp": ("pp", "tp"), "dpcp": ("dp", "cp")}  # named groups over several dimensions: mp = the ranks of
# one model replica; dpcp = the ranks whose gradients are averaged (data and context parallel: the same weights)


class LayoutError(SettingError):
    """A split of the world the model, the batch or the schedule does not allow, in one sentence."""


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutError(f"{name}={value} must be a positive integer.")


@dataclass(frozen=True)
class Layout:
    """Degrees of each dimension of a split of `world_size` ranks (no process groups)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1  # expert parallelism: a factor of dp (see `expert_groups`), not a dimension of its own

    @classmethod
    def infer(cls, world_size: int, tp: int = 1, pp: int = 1, dp: Optional[int] = None, cp: int = 1,
              ep: int = 1) -> "Layout":
        """Infer dp from the world size (or check the given one); ep must divide it."""
        _positive("world size", world_size)
        for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("dp", 1 if dp is None else dp), ("ep", ep)):
            _positive(f"parallel.{name}", value)
        degrees = {"tp": tp, "pp": pp, "cp": cp}
        shown = [name for name in ("tp", "pp", "cp") if name != "cp" or cp > 1]  # name cp only when it is used
        model_parallel = tp * pp * cp
        product_text = " x ".join(f"parallel.{name}" for name in shown)
        if world_size % model_parallel:
            raise LayoutError(f"world size {world_size} is not a multiple of {product_text} = {model_parallel}; "
                              f"launch a multiple of {model_parallel} processes or change {'/'.join(shown)}.")
        inferred = world_size // model_parallel
        if dp is not None and dp != inferred:
            split = " x ".join(f"{name} {degrees[name]}" for name in shown)
            raise LayoutError(f"parallel.dp={dp} but world size {world_size} / ({split}) = {inferred}; "
                              f"drop parallel.dp or launch {dp * model_parallel} processes.")
        if inferred % ep:
            raise LayoutError(f"parallel.ep={ep} does not divide the data-parallel degree dp={inferred} (experts are "
                              f"split over ep of the dp ranks); use an ep that divides {inferred}.")
        return cls(world_size, tp, pp, inferred, cp, ep)

    def size(self, name: str) -> int:
        return getattr(self, name)

    def sizes(self) -> Dict[str, int]:
        """{dimension: degree}, outermost first (the DeviceMesh's shape)."""
        return {name: self.size(name) for name in DIMS}

    def coords(self, rank: int) -> Dict[str, int]:
        """{dimension: index} of a global rank."""
        out = {}
        for name in reversed(DIMS):
            rank, out[name] = divmod(rank, self.size(name))
        return {name: out[name] for name in DIMS}

    def rank_of(self, **coords: int) -> int:
        """The global rank at these coordinates (dimensions not named: index 0)."""
        unknown = set(coords) - set(DIMS)
        if unknown:
            raise ValueError(f"unknown dimensions {sorted(unknown)}; the layout has {', '.join(DIMS)}")
        rank = 0
        for name in DIMS:
            rank = rank * self.size(name) + coords.get(name, 0)
        return rank

    def groups_of(self, *names: str) -> List[List[int]]:
        """Every group of ranks that differ only in `names` (each a list of ranks, those dims varying inside)."""
        varying = [name for name in DIMS if name in names]
        fixed = [name for name in DIMS if name not in names]
        groups = []
        for outer in product(*(range(self.size(name)) for name in fixed)):
            base = dict(zip(fixed, outer))
            groups.append([self.rank_of(**base, **dict(zip(varying, inner)))
                           for inner in product(*(range(self.size(name)) for name in varying))])
        return groups

    def groups(self) -> Dict[str, List[List[int]]]:
        """Every named group kind (each dimension, and each combination in COMBOS) with its rank lists."""
        named = {name: (name,) for name in ("tp", "dp", "pp", "cp")}
        named.update(COMBOS)
        return {name: self.groups_of(*dims) for name, dims in named.items()}

    def expert_groups(self) -> Dict[str, List[List[int]]]:
        """Expert parallelism's groups, inside each dp group: a dp rank d is expert rank d % ep of the experts
        group of dp ranks d - d % ep ... (ep consecutive dp ranks: near each other, for the all-to-all), and
        "expert_grad" joins the ranks holding the same experts, whose grads are averaged: the same tp, pp and
        d % ep, every cp rank."""
        experts, grads = [], []
        for ranks in self.groups_of("dp", "cp"):  # each (pp, tp)'s ranks, dp major, cp minor
            by_dp = [ranks[d * self.cp:(d + 1) * self.cp] for d in range(self.dp)]
            for c in range(self.cp):
                for first in range(0, self.dp, self.ep):
                    experts.append([by_dp[d][c] for d in range(first, first + self.ep)])
            for e in range(self.ep):
                grads.append([rank for d in range(e, self.dp, self.ep) for rank in by_dp[d]])
        return {"ep": experts, "expert_grad": grads}

    def describe(self) -> str:
        parts = [f"{name} {self.size(name)}" for name in ("tp", "cp", "dp", "pp") if name != "cp" or self.cp > 1]
        return f"world {self.world_size} = " + " x ".join(parts) + (f" (ep {self.ep} of dp)" if self.ep > 1 else "")


@dataclass(frozen=True)
class Workload:
    """What a layout must divide: the model's shape and the step's batch (plain numbers)."""

    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    n_layers: int
    seq_len: int
    batch_size: int
    tie_embeddings: bool = False
    moe_experts: int = 0
    moe_shared_ffn_dim: int = 0


def check_context_parallel(layout: "Layout", mode: str, workload: "Workload", sequence_parallel: bool) -> None:
    """cp splits every sequence into 2 cp equal chunks; Ulysses also scatters this rank's heads over cp."""
    cp = layout.cp
    if cp == 1:
        return
    if workload.seq_len % (2 * cp):
        raise LayoutError(f"parallel.cp={cp} cuts each sequence into 2 x cp = {2 * cp} equal chunks but "
                          f"train.seq_len={workload.seq_len} is not a multiple of {2 * cp}; use a multiple of {2 * cp}.")
    if mode == "ulysses":
        for key, count in (("model.n_heads", workload.n_heads), ("model.n_kv_heads", workload.n_kv_heads)):
            if count % (layout.tp * cp):
                raise LayoutError(f"parallel.cp_mode=ulysses scatters {key}={count} over parallel.tp x parallel.cp = "
                                  f"{layout.tp} x {cp}, which does not divide it; use parallel.cp_mode=ring or a cp "
                                  f"that divides the heads each tp rank holds.")


def check_tensor_parallel(tp: int, n_heads: int, n_kv_heads: int, ffn_dim: int) -> None:
    """tp must split the attention heads, the kv heads and the MLP width evenly."""
    _positive("parallel.tp", tp)
    for key, count in (("model.n_heads", n_heads), ("model.n_kv_heads", n_kv_heads)):
        if count % tp:
            what = "the head count" if key == "model.n_heads" else "the kv-head count"
            raise LayoutError(f"parallel.tp={tp} does not divide {key}={count}; use a tp that divides {what}.")
    if ffn_dim % tp:
        raise LayoutError(f"parallel.tp={tp} does not divide the MLP width {ffn_dim} (model.ffn_dim); "
                          f"set model.ffn_dim to a multiple of tp.")


def check_expert_parallel(ep: int, experts: int) -> None:
    """ep splits each mixture of experts' experts evenly."""
    if ep > 1 and not experts:
        raise LayoutError(f"parallel.ep={ep} splits a mixture of experts, but model.moe_experts=0; set "
                          f"model.moe_experts to a multiple of {ep} or parallel.ep=1.")
    if experts % ep:
        raise LayoutError(f"parallel.ep={ep} does not divide model.moe_experts={experts}; use an ep that divides the "
                          f"expert count.")


def micro_batch_size(batch_size: int, dp: int, microbatches: int) -> int:
    """Sequences per micro-batch: batch_size / (dp x microbatches), which must divide."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LayoutError(f"train.batch_size={batch_size} must be positive.")
    per_step = dp * microbatches
    if batch_size % per_step:
        raise LayoutError(f"train.batch_size={batch_size} is not divisible by dp x parallel.microbatches = "
                          f"{dp} x {microbatches}; use a multiple of {per_step}.")
    return batch_size // per_step


def check_pipeline(parallel: Any, n_layers: int, tie_embeddings: bool) -> None:
    """Pipeline rules: layers split evenly into pp x vpp chunks, micro-batch counts the schedule allows."""
    from plait.parallel.pipeline.partition import check_partition
    from plait.parallel.pipeline.schedule import ScheduleError, check_microbatches, schedule_name

    if parallel.pp == 1:
        if parallel.vpp != 1:
            raise LayoutError(f"parallel.vpp={parallel.vpp} needs parallel.pp > 1; set parallel.vpp=1 or raise pp.")
        return
    try:
        check_partition(n_layers, parallel.pp, parallel.vpp)
        check_microbatches(schedule_name(parallel.schedule, parallel.vpp), parallel.pp, parallel.vpp,
                           parallel.microbatches)
    except ScheduleError as error:
        raise LayoutError(str(error)) from None


ZERO_LEVELS = (0, 1, 2, 3)  # 0: replicated; 1: optimizer state sharded over dp; 2: + grads; 3: + weights (FSDP2)
BACKENDS = ("auto", "nccl", "gloo")


def check_settings(parallel: Any) -> None:
    """The `parallel` group's own fields: degrees, and each choice against the table that builds it."""
    from plait.parallel.column_overlap import OVERLAP_CHOICES
    from plait.parallel.context import CP_MODES
    from plait.parallel.pipeline.schedule import BUILDERS, V_SCHEDULES, splits_backward
    from plait.parallel.pipeline.transport import TRANSPORTS

    for key in ("tp", "pp", "cp", "ep", "vpp", "microbatches", "timeout_s"):
        _positive(f"parallel.{key}", getattr(parallel, key))
    if parallel.train_timeout_s is not None:
        _positive("parallel.train_timeout_s", parallel.train_timeout_s)
    choice(LayoutError, "parallel.schedule", parallel.schedule, BUILDERS)
    if parallel.schedule in V_SCHEDULES and parallel.vpp == 1 and parallel.pp > 1:
        parallel.vpp = 2  # the V schedules run two chunks per rank; vpp left at its default means that
    choice(LayoutError, "parallel.pp_transport", parallel.pp_transport, TRANSPORTS)
    choice(LayoutError, "parallel.backend", parallel.backend, BACKENDS)
    choice(LayoutError, "parallel.zero", parallel.zero, ZERO_LEVELS)
    if parallel.overlap_param_gather and parallel.zero != 1:
        raise LayoutError(f"parallel.overlap_param_gather=true overlaps ZeRO-1's weight all-gathers, but "
                          f"parallel.zero={parallel.zero}; set parallel.zero=1 (ZeRO-2/3 gather each block in its "
                          f"own forward already) or drop parallel.overlap_param_gather.")
    number(LayoutError, "parallel.bucket_mb", parallel.bucket_mb, low=0, low_open=True)
    choice(LayoutError, "parallel.cp_mode", parallel.cp_mode, CP_MODES)
    choice(LayoutError, "parallel.tp_overlap", str(parallel.tp_overlap).lower(), OVERLAP_CHOICES)
    if str(parallel.tp_overlap).lower() == "true" and splits_backward(parallel):
        raise LayoutError(f"parallel.tp_overlap=true makes each column-parallel layer one autograd node, which "
                          f"parallel.schedule={parallel.schedule} cannot split into input and weight grads; set "
                          f"parallel.tp_overlap=auto (off under zero-bubble schedules) or another parallel.schedule.")


def validate(parallel: Any, world_size: int, workload: Optional[Workload] = None) -> Layout:
    """Every layout rule for `world_size` ranks (and, with a workload, for that model and batch); the Layout."""
    check_settings(parallel)
    layout = Layout.infer(world_size, parallel.tp, parallel.pp, parallel.dp, parallel.cp, parallel.ep)
    if workload is None:
        return layout
    check_tensor_parallel(layout.tp, workload.n_heads, workload.n_kv_heads, workload.ffn_dim)
    if workload.moe_shared_ffn_dim % layout.tp:
        raise LayoutError(f"parallel.tp={layout.tp} does not divide the shared expert's width "
                          f"model.moe_shared_ffn_dim={workload.moe_shared_ffn_dim}; set it to a multiple of tp.")
    check_expert_parallel(layout.ep, workload.moe_experts)
    check_context_parallel(layout, parallel.cp_mode, workload, parallel.sequence_parallel)
    check_pipeline(parallel, workload.n_layers, workload.tie_embeddings)
    micro_batch_size(workload.batch_size, layout.dp, parallel.microbatches)
    if parallel.sequence_parallel and (workload.seq_len // layout.cp) % layout.tp:
        raise LayoutError(f"parallel.sequence_parallel=true needs train.seq_len={workload.seq_len}"
                          f"{f' / parallel.cp={layout.cp}' if layout.cp > 1 else ''} divisible by "
                          f"parallel.tp={layout.tp}.")
    return layout
