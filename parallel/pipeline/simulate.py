"""Check a schedule and play it on a clock: the validator and the simulator share one walker.

The walker executes every rank's action list with the runtime's semantics: sends and
receives are posted and never block; a compute waits until the data it consumes has been
sent (its receive must be posted before it), or, for a hop between two stages on one rank,
until the producing compute has run there; then it takes its cost. Communication itself
costs nothing, so the step time it returns is the schedule's overhead-free time.

`validate` rejects a schedule that could not run: a compute whose input is not there yet
(a backward before its forward, a W before its I, a forward before its receive), a send of
something not yet computed, a send without its receive (or a receive without its send), a
missing or repeated compute (each backward runs once, whole as B or split as I and W), a
stage on the wrong rank, two messages between the same ranks received in the other order
than sent (NCCL matches by order), more micro-batches in flight on a rank than a bound
given, or an order in which every unfinished rank waits on a receive that no one will send
(deadlock).
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from plait.parallel.pipeline.schedule import (BACKWARDS, COMPUTE, Action, Kind, ScheduleError, matching_recv,
                                              matching_send, peer_of, receives_of, stage_ranks)


@dataclass
class Timeline:
    """The simulated step: each rank's compute intervals, the step time and the bubble."""

    intervals: List[List[Tuple[Action, float, float]]] = field(default_factory=list)
    step_time: float = 0.0
    busy_time: float = 0.0  # the largest per-rank sum of compute costs (the ideal step time)

    @property
    def bubble_fraction(self) -> float:
        """Idle time as a share of the ideal time: step / ideal - 1 ((p-1)/m for 1F1B)."""
        return self.step_time / self.busy_time - 1.0 if self.busy_time else 0.0


def stage_owners(actions: Sequence[Sequence[Action]]) -> Dict[int, int]:
    """stage -> the rank whose list holds it (the placement, read off the schedule itself)."""
    return {action.stage: rank for rank, rank_actions in enumerate(actions) for action in rank_actions}


def _ran(kinds: Sequence[Kind], mb: int, stage: int, done: set) -> bool:
    return any(Action(kind, mb, stage) in done for kind in kinds)


def _missing_input(action: Action, done: set, owner: Dict[int, int], n_stages: int) -> Optional[str]:
    """Why `action` cannot run yet on its rank (None when it can)."""
    mb, stage, kind = action.microbatch, action.stage, action.kind
    if kind == Kind.F and stage > 0:
        if owner[stage - 1] != owner[stage] and Action(Kind.RECV_F, mb, stage) not in done:
            return f"{action!r} runs before its input's receive is posted ({Action(Kind.RECV_F, mb, stage)!r})"
        if owner[stage - 1] == owner[stage] and Action(Kind.F, mb, stage - 1) not in done:
            return f"{action!r} runs before {Action(Kind.F, mb, stage - 1)!r}, on the same rank, made its input"
    if kind in BACKWARDS:
        if Action(Kind.F, mb, stage) not in done:
            return f"backward {action!r} runs before its forward {Action(Kind.F, mb, stage)!r}"
        if stage < n_stages - 1:
            if owner[stage + 1] != owner[stage] and Action(Kind.RECV_B, mb, stage) not in done:
                return f"{action!r} runs before its output grad's receive is posted ({Action(Kind.RECV_B, mb, stage)!r})"
            if owner[stage + 1] == owner[stage] and not _ran(BACKWARDS, mb, stage + 1, done):
                return f"{action!r} runs before the backward of stage {stage + 1}, on the same rank, made its output grad"
    if kind == Kind.W and Action(Kind.I, mb, stage) not in done:
        return f"{action!r} runs before its input-grad half {Action(Kind.I, mb, stage)!r}"
    if kind == Kind.SEND_F and Action(Kind.F, mb, stage) not in done:
        return f"{action!r} sends before {Action(Kind.F, mb, stage)!r} has run"
    if kind == Kind.SEND_B and not _ran(BACKWARDS, mb, stage, done):
        return f"{action!r} sends before the backward of micro-batch {mb} on stage {stage} has run"
    return None


def _check_structure(actions: Sequence[Sequence[Action]], pp: int, vpp: int, microbatches: int,
                     forward_only: bool, style: str) -> None:
    """Every compute exactly once on the right rank; every send has its receive on the peer rank."""
    ranks = stage_ranks(pp, vpp, style)
    n_stages = pp * vpp
    counts = Counter()
    for rank, rank_actions in enumerate(actions):
        for action in rank_actions:
            if not 0 <= action.stage < n_stages or not 0 <= action.microbatch < microbatches:
                raise ScheduleError(f"rank {rank}: {action!r} is outside {n_stages} stages x {microbatches} micro-batches")
            if ranks[action.stage] != rank:
                raise ScheduleError(f"rank {rank}: {action!r} belongs to rank {ranks[action.stage]}")
            counts[action] += 1
    for stage in range(n_stages):
        for mb in range(microbatches):
            expected = {Kind.F: 1}
            if not forward_only:
                split = counts[Action(Kind.I, mb, stage)] > 0
                expected.update({Kind.B: 0 if split else 1, Kind.I: int(split), Kind.W: int(split)})
            for kind, count in expected.items():
                if counts[Action(kind, mb, stage)] != count:
                    raise ScheduleError(f"{Action(kind, mb, stage)!r} appears {counts[Action(kind, mb, stage)]} times "
                                        f"where {count} is due; every forward and backward runs exactly once "
                                        f"(a backward whole as B, or split as I then W)")
    for action, count in counts.items():
        if count != 1:
            raise ScheduleError(f"{action!r} appears {count} times")
        if action.kind in (Kind.SEND_F, Kind.SEND_B) and counts[matching_recv(action)] != 1:
            raise ScheduleError(f"send {action!r} has no matching receive {matching_recv(action)!r}")
        if action.kind in (Kind.RECV_F, Kind.RECV_B) and counts[matching_send(action)] != 1:
            raise ScheduleError(f"receive {action!r} has no matching send {matching_send(action)!r}")
        if action.kind in (Kind.B, Kind.I, Kind.W) and forward_only:
            raise ScheduleError(f"a forward-only schedule holds a backward {action!r}")


def _check_pair_order(actions: Sequence[Sequence[Action]], owner: Dict[int, int]) -> None:
    """Between any two ranks, sends leave in the order their receives are posted.

    NCCL matches point-to-point messages by order, not by tag, so a schedule that sends
    two messages to one peer in the other order than the peer receives them would swap them.
    """
    pp = len(actions)
    for src in range(pp):
        for dst in range(pp):
            if src == dst:
                continue
            sent = [a for a in actions[src] if a.kind in (Kind.SEND_F, Kind.SEND_B) and peer_of(a, owner) == dst]
            received = [matching_send(a) for a in actions[dst]
                        if a.kind in (Kind.RECV_F, Kind.RECV_B) and peer_of(a, owner) == src]
            for first, second in zip(sent, received):
                if first != second:
                    raise ScheduleError(f"rank {src} sends {first!r} to rank {dst} where rank {dst} "
                                        f"expects {second!r}; messages between two ranks must keep their order")


def execute(actions: Sequence[Sequence[Action]], cost: Callable[[Action], float]) -> Timeline:
    """Walk every rank's list on a shared clock; raises ScheduleError on a stall or a missing input."""
    pp = len(actions)
    owner = stage_owners(actions)
    n_stages = 1 + max(owner, default=0)
    pointer, clock = [0] * pp, [0.0] * pp
    done: List[set] = [set() for _ in range(pp)]
    posted: Dict[Action, float] = {}
    timeline = Timeline(intervals=[[] for _ in range(pp)])
    busy = [0.0] * pp
    while any(pointer[r] < len(actions[r]) for r in range(pp)):
        progressed = False
        for rank in range(pp):
            while pointer[rank] < len(actions[rank]):
                action = actions[rank][pointer[rank]]
                problem = _missing_input(action, done[rank], owner, n_stages)
                if problem:
                    raise ScheduleError(f"rank {rank}: {problem}")
                if action.kind in COMPUTE:
                    needed = [matching_send(recv) for recv in receives_of(action, owner)]  # none within a rank
                    if any(send not in posted for send in needed):
                        break  # blocked on data not sent yet: try the other ranks
                    start = max([clock[rank]] + [posted[send] for send in needed])
                    clock[rank] = start + cost(action)
                    busy[rank] += cost(action)
                    timeline.intervals[rank].append((action, start, clock[rank]))
                elif action.kind in (Kind.SEND_F, Kind.SEND_B):
                    posted[action] = clock[rank]
                done[rank].add(action)
                pointer[rank] += 1
                progressed = True
        if not progressed:
            waits = "; ".join(f"rank {r} waits at {actions[r][pointer[r]]!r}" for r in range(pp)
                              if pointer[r] < len(actions[r]))
            raise ScheduleError(f"the schedule deadlocks: {waits}")
    timeline.step_time = max(clock) if clock else 0.0
    timeline.busy_time = max(busy) if busy else 0.0
    return timeline


def validate(actions: Sequence[Sequence[Action]], pp: int, vpp: int, microbatches: int, *,
             forward_only: bool = False, style: str = "loop",
             max_live: Union[None, int, Sequence[int]] = None) -> None:
    """Raise ScheduleError if the schedule is incomplete, mismatched, out of order or deadlocks.

    `style` is the placement the stages must follow ("loop" or "v", see schedule.py);
    `max_live`, one bound or one per rank, caps the chunk-forwards a rank holds before their
    weight grads are done (`peak_live_microbatches`).
    """
    if len(actions) != pp:
        raise ScheduleError(f"the schedule has {len(actions)} rank lists for parallel.pp={pp}")
    _check_structure(actions, pp, vpp, microbatches, forward_only, style)
    _check_pair_order(actions, stage_owners(actions))
    execute(actions, lambda action: 1.0)
    if max_live is not None:
        bounds = [max_live] * pp if isinstance(max_live, int) else list(max_live)
        for rank, (rank_actions, bound) in enumerate(zip(actions, bounds)):
            peak = peak_live_microbatches(rank_actions)
            if peak > bound:
                raise ScheduleError(f"rank {rank} holds {peak} micro-batches' activations at its peak, "
                                    f"over the bound of {bound}")


def unit_cost(forward: float = 1.0, backward: float = 2.0, weight: Optional[float] = None) -> Callable[[Action], float]:
    """A cost function: F costs `forward`, a whole backward B `backward`, of which W is `weight`
    (half of it by default) and I the rest."""
    weight = backward / 2 if weight is None else weight
    costs = {Kind.F: forward, Kind.B: backward, Kind.I: backward - weight, Kind.W: weight}
    return lambda action: costs[action.kind]


def simulate(actions: Sequence[Sequence[Action]], forward: float = 1.0, backward: float = 2.0,
             weight: Optional[float] = None) -> Timeline:
    """Each rank's timeline, the step time and the bubble for per-chunk costs: F, whole backward, its W part.

    The paper's F = B = W = 1 (B there is the input half, I here) is `simulate(actions, 1, 2, 1)`.
    """
    return execute(actions, unit_cost(forward, backward, weight))


def peak_live_microbatches(actions: Sequence[Action], until: str = "weights") -> int:
    """The most (micro-batch, stage) forwards a rank holds at once, in list order.

    A forward's activations are held until its weight grads are done (`until="weights"`: B
    or W), or, counting only what the input-grad half needs, until B or I (`until="input"`).
    """
    ends = (Kind.B, Kind.W) if until == "weights" else BACKWARDS
    live, peak = 0, 0
    for action in actions:
        live += 1 if action.kind == Kind.F else -1 if action.kind in ends else 0
        peak = max(peak, live)
    return peak
