"""Pipeline schedules as data: each pp rank's ordered list of actions.

An action is (kind, micro-batch, stage). `stage` is the *virtual* stage: the model is cut
into p x v chunks, chunk k runs on pp rank k mod p (Megatron's interleaving: rank r holds
chunks r, r + p, r + 2p, ...). Kinds:

- F, B: forward and backward of one micro-batch through one chunk;
- SEND_F(mb, s): send stage s's output to stage s + 1; RECV_F(mb, s): receive stage s's input;
- SEND_B(mb, s): send the grad of stage s's input to stage s - 1; RECV_B(mb, s): receive
  the grad of stage s's output.

A schedule is built in two passes, like `torch.distributed.pipelining`: the compute order
(`compute_order`), then `lower` adds the communication around each compute action: a
compute's sends right after it, its receives posted before it (right before it, or one or
more computes ahead with `prefetch`), and the runtime issues each run of consecutive
communication actions as one batched isend/irecv (so after a forward, "send my output" and
"receive the next backward's grad" go out together, Megatron's send_forward_recv_backward).
A RECV action posts the buffer; the compute that needs the data waits for it.

Allowed micro-batch counts m: any m >= 1 for GPipe and 1F1B. Interleaved 1F1B (v > 1)
needs m to be a multiple of p: Megatron's order walks the chunks in rounds of p micro-batches
(p forwards on chunk 0, then p on chunk 1, ...), so that the first micro-batch of a round comes
back around the ring exactly when the round on the previous chunk ends. A partial round
would leave a chunk waiting on a micro-batch that is scheduled later on another rank.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Dict, List, Sequence


class ScheduleError(ValueError):
    """A schedule that cannot be built or would not run, explained in one sentence."""


class Kind(str, Enum):
    F = "F"
    B = "B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMPUTE = (Kind.F, Kind.B)


@dataclass(frozen=True)
class Action:
    kind: Kind
    microbatch: int
    stage: int

    def __repr__(self) -> str:
        return f"{self.kind.value}{self.microbatch}s{self.stage}"


def schedule_name(schedule: str, vpp: int) -> str:
    """The config's `parallel.schedule` plus `parallel.vpp` as a builder name (1f1b with v > 1 interleaves)."""
    if schedule == "1f1b" and vpp > 1:
        return "interleaved"
    return schedule


def check_microbatches(schedule: str, pp: int, vpp: int, microbatches: int) -> None:
    """Raise ScheduleError (one sentence naming the setting and the fix) for counts the schedule rejects."""
    if schedule not in BUILDERS:
        raise ScheduleError(f"parallel.schedule={schedule} is not one of {', '.join(BUILDERS)} "
                            f"(1f1b with parallel.vpp > 1 interleaves).")
    for name, value in (("parallel.pp", pp), ("parallel.vpp", vpp), ("parallel.microbatches", microbatches)):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name}={value} must be a positive integer.")
    if schedule == "1f1b" and vpp != 1:
        raise ScheduleError(f"the 1f1b schedule runs one chunk per rank but parallel.vpp={vpp}; use the interleaved schedule.")
    if schedule == "interleaved" and microbatches % pp:
        raise ScheduleError(
            f"interleaved 1F1B needs parallel.microbatches={microbatches} to be a multiple of parallel.pp={pp} "
            f"(micro-batches go round the ring in groups of pp); use {pp * max(1, -(-microbatches // pp))}.")


def stage_ranks(pp: int, vpp: int) -> List[int]:
    """The pp rank of each virtual stage: stage k lives on rank k mod p."""
    return [k % pp for k in range(pp * vpp)]


def local_stages(pp_rank: int, pp: int, vpp: int) -> List[int]:
    """The virtual stages held by `pp_rank`, in model order (its chunks 0..v-1)."""
    return [pp_rank + chunk * pp for chunk in range(vpp)]


def _gpipe(rank: int, pp: int, vpp: int, m: int, forward_only: bool) -> List[Action]:
    stages = local_stages(rank, pp, vpp)
    order = [Action(Kind.F, mb, s) for s in stages for mb in range(m)]
    if not forward_only:
        order += [Action(Kind.B, mb, s) for s in reversed(stages) for mb in range(m)]
    return order


def _one_f_one_b(rank: int, pp: int, m: int) -> List[Action]:
    """Warm-up forwards (p - r - 1), then one forward / one backward, then the remaining backwards."""
    warmup = min(pp - rank - 1, m)
    order = [Action(Kind.F, mb, rank) for mb in range(warmup)]
    for index in range(m - warmup):
        order += [Action(Kind.F, warmup + index, rank), Action(Kind.B, index, rank)]
    order += [Action(Kind.B, mb, rank) for mb in range(m - warmup, m)]
    return order


def _interleaved(rank: int, pp: int, vpp: int, m: int) -> List[Action]:
    """Megatron's interleaved 1F1B: the k-th forward (backward) of a rank is a fixed (chunk, mb).

    Forwards go in rounds of p micro-batches per chunk, chunk 0 to v-1; backwards the same
    with the chunks reversed. Warm-up: (p - r - 1) * 2 + (v - 1) * p forwards, capped at m v.
    """
    total = m * vpp

    def chunk_and_mb(k: int, forward: bool):
        in_group = k % (pp * vpp)
        chunk = in_group // pp
        if not forward:
            chunk = vpp - 1 - chunk
        return rank + chunk * pp, (k // (pp * vpp)) * pp + in_group % pp

    def forward(k):
        stage, mb = chunk_and_mb(k, True)
        return Action(Kind.F, mb, stage)

    def backward(k):
        stage, mb = chunk_and_mb(k, False)
        return Action(Kind.B, mb, stage)

    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    order = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [forward(warmup + k), backward(k)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


# schedule name -> the compute order of one pp rank (rank, pp, vpp, m); the keys are the choices
BUILDERS: Dict[str, Callable[[int, int, int, int], List[Action]]] = {
    "gpipe": lambda rank, pp, vpp, m: _gpipe(rank, pp, vpp, m, forward_only=False),
    "1f1b": lambda rank, pp, vpp, m: _one_f_one_b(rank, pp, m),
    "interleaved": _interleaved,
}


def compute_order(schedule: str, pp: int, vpp: int, microbatches: int, *, forward_only: bool = False) -> List[List[Action]]:
    """Each rank's forwards and backwards in execution order (no communication yet)."""
    check_microbatches(schedule, pp, vpp, microbatches)
    if forward_only:
        return [_gpipe(r, pp, vpp, microbatches, forward_only=True) for r in range(pp)]
    return [BUILDERS[schedule](r, pp, vpp, microbatches) for r in range(pp)]


def _receives(action: Action, n_stages: int) -> List[Action]:
    if action.kind == Kind.F and action.stage > 0:
        return [Action(Kind.RECV_F, action.microbatch, action.stage)]
    if action.kind == Kind.B and action.stage < n_stages - 1:
        return [Action(Kind.RECV_B, action.microbatch, action.stage)]
    return []


def _sends(action: Action, n_stages: int) -> List[Action]:
    if action.kind == Kind.F and action.stage < n_stages - 1:
        return [Action(Kind.SEND_F, action.microbatch, action.stage)]
    if action.kind == Kind.B and action.stage > 0:
        return [Action(Kind.SEND_B, action.microbatch, action.stage)]
    return []


def lower(order: Sequence[Action], n_stages: int, prefetch: int = 0) -> List[Action]:
    """Add communication: each compute's sends right after it, its receives posted before it.

    A receive only posts the buffer; the compute that needs it waits for the data. With
    `prefetch` k, the receives of compute i + k + 1 are posted right after compute i (before
    compute i + 1 runs), so the data can arrive while compute i + 1 runs instead of after it.
    """
    actions: List[Action] = []
    for action in order[:prefetch + 1]:
        actions += _receives(action, n_stages)
    for index, action in enumerate(order):
        actions.append(action)
        actions += _sends(action, n_stages)
        if index + prefetch + 1 < len(order):
            actions += _receives(order[index + prefetch + 1], n_stages)
    return actions


def build_schedule(schedule: str, pp: int, vpp: int, microbatches: int, *,
                   forward_only: bool = False, prefetch: int = 0) -> List[List[Action]]:
    """Each pp rank's full action list (compute and communication) for one step.

    `schedule` is gpipe, 1f1b or interleaved (1f1b with vpp > 1 is read as interleaved).
    `forward_only` gives the forwards of GPipe's order (evaluation). `prefetch`: how many
    computes ahead receives are posted (see `lower`).
    """
    schedule = schedule_name(schedule, vpp)
    n_stages = pp * vpp
    return [lower(order, n_stages, prefetch)
            for order in compute_order(schedule, pp, vpp, microbatches, forward_only=forward_only)]


def format_schedule(actions: Sequence[Sequence[Action]]) -> str:
    """One line per rank: its actions in order (for logs and error messages)."""
    return "\n".join(f"rank {r}: " + " ".join(map(repr, rank_actions)) for r, rank_actions in enumerate(actions))
