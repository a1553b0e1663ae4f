"""Check a schedule and play it on a clock: the validator and the simulator share one walker.

The walker executes every rank's action list with the runtime's semantics: sends and
receives are posted and never block; a compute waits until the data it consumes has been
sent (its receive must be posted before it), then takes its cost. Communication itself costs nothing, so the step time
it returns is the schedule's overhead-free time.

`validate` rejects a schedule that could not run: a compute whose input is not there yet
(a backward before its forward, a forward before its receive), a send of something not yet
computed, a send without its receive (or a receive without its send), a missing or repeated
compute, a stage on the wrong rank, two messages between the same ranks received in the
other order than sent (NCCL matches by order), or an order in which every unfinished rank waits on a
receive that no one will send (deadlock).
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from plait.parallel.pipeline.schedule import COMPUTE, Action, Kind, ScheduleError


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


def _producer(action: Action) -> Optional[Action]:
    """The compute a send ships the result of."""
    if action.kind == Kind.SEND_F:
        return Action(Kind.F, action.microbatch, action.stage)
    if action.kind == Kind.SEND_B:
        return Action(Kind.B, action.microbatch, action.stage)
    return None


def matching_send(recv: Action) -> Action:
    """The send a receive waits for: stage s's input comes from s-1's output, its output grad from s+1."""
    if recv.kind == Kind.RECV_F:
        return Action(Kind.SEND_F, recv.microbatch, recv.stage - 1)
    return Action(Kind.SEND_B, recv.microbatch, recv.stage + 1)


def matching_recv(send: Action) -> Action:
    if send.kind == Kind.SEND_F:
        return Action(Kind.RECV_F, send.microbatch, send.stage + 1)
    return Action(Kind.RECV_B, send.microbatch, send.stage - 1)


def _inputs(action: Action, n_stages: int) -> List[Action]:
    """The receives whose data a compute consumes."""
    if action.kind == Kind.F and action.stage > 0:
        return [Action(Kind.RECV_F, action.microbatch, action.stage)]
    if action.kind == Kind.B and action.stage < n_stages - 1:
        return [Action(Kind.RECV_B, action.microbatch, action.stage)]
    return []


def _missing_input(action: Action, done: set, n_stages: int) -> Optional[str]:
    """Why `action` cannot run yet on its rank (None when it can)."""
    mb, stage = action.microbatch, action.stage
    if action.kind == Kind.F and stage > 0 and Action(Kind.RECV_F, mb, stage) not in done:
        return f"{action!r} runs before its input's receive is posted ({Action(Kind.RECV_F, mb, stage)!r})"
    if action.kind == Kind.B:
        if Action(Kind.F, mb, stage) not in done:
            return f"backward {action!r} runs before its forward {Action(Kind.F, mb, stage)!r}"
        if stage < n_stages - 1 and Action(Kind.RECV_B, mb, stage) not in done:
            return f"{action!r} runs before its output grad's receive is posted ({Action(Kind.RECV_B, mb, stage)!r})"
    producer = _producer(action)
    if producer is not None and producer not in done:
        return f"{action!r} sends before {producer!r} has run"
    return None


def _check_structure(actions: Sequence[Sequence[Action]], pp: int, vpp: int, microbatches: int,
                     forward_only: bool) -> None:
    """Every compute exactly once on the right rank; every send has its receive on the peer rank."""
    n_stages = pp * vpp
    counts = Counter()
    for rank, rank_actions in enumerate(actions):
        for action in rank_actions:
            if not 0 <= action.stage < n_stages or not 0 <= action.microbatch < microbatches:
                raise ScheduleError(f"rank {rank}: {action!r} is outside {n_stages} stages x {microbatches} micro-batches")
            if action.stage % pp != rank:
                raise ScheduleError(f"rank {rank}: {action!r} belongs to rank {action.stage % pp}")
            counts[action] += 1
    kinds = (Kind.F,) if forward_only else (Kind.F, Kind.B)
    for kind in kinds:
        for stage in range(n_stages):
            for mb in range(microbatches):
                if counts[Action(kind, mb, stage)] != 1:
                    raise ScheduleError(f"{Action(kind, mb, stage)!r} appears {counts[Action(kind, mb, stage)]} times; "
                                        f"every compute must run exactly once")
    for action, count in counts.items():
        if count != 1:
            raise ScheduleError(f"{action!r} appears {count} times")
        if action.kind in (Kind.SEND_F, Kind.SEND_B) and counts[matching_recv(action)] != 1:
            raise ScheduleError(f"send {action!r} has no matching receive {matching_recv(action)!r}")
        if action.kind in (Kind.RECV_F, Kind.RECV_B) and counts[matching_send(action)] != 1:
            raise ScheduleError(f"receive {action!r} has no matching send {matching_send(action)!r}")
        if action.kind == Kind.B and forward_only:
            raise ScheduleError(f"a forward-only schedule holds a backward {action!r}")


def _peer(action: Action, pp: int) -> int:
    """The rank at the other end of a send or receive."""
    step = 1 if action.kind in (Kind.SEND_F, Kind.RECV_B) else -1
    return (action.stage + step) % pp


def _check_pair_order(actions: Sequence[Sequence[Action]], pp: int) -> None:
    """Between any two ranks, sends leave in the order their receives are posted.

    NCCL matches point-to-point messages by order, not by tag, so a schedule that sends
    two messages to one peer in the other order than the peer receives them would swap them.
    """
    for src in range(pp):
        for dst in range(pp):
            if src == dst:
                continue
            sent = [a for a in actions[src] if a.kind in (Kind.SEND_F, Kind.SEND_B) and _peer(a, pp) == dst]
            received = [matching_send(a) for a in actions[dst]
                        if a.kind in (Kind.RECV_F, Kind.RECV_B) and _peer(a, pp) == src]
            for first, second in zip(sent, received):
                if first != second:
                    raise ScheduleError(f"rank {src} sends {first!r} to rank {dst} where rank {dst} "
                                        f"expects {second!r}; messages between two ranks must keep their order")


def execute(actions: Sequence[Sequence[Action]], cost: Callable[[Action], float]) -> Timeline:
    """Walk every rank's list on a shared clock; raises ScheduleError on a stall or a missing input."""
    pp = len(actions)
    n_stages = 1 + max((a.stage for rank_actions in actions for a in rank_actions), default=0)
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
                problem = _missing_input(action, done[rank], n_stages)
                if problem:
                    raise ScheduleError(f"rank {rank}: {problem}")
                if action.kind in COMPUTE:
                    needed = [matching_send(recv) for recv in _inputs(action, n_stages)]
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
             forward_only: bool = False) -> None:
    """Raise ScheduleError if the schedule is incomplete, mismatched, out of order or deadlocks."""
    if len(actions) != pp:
        raise ScheduleError(f"the schedule has {len(actions)} rank lists for parallel.pp={pp}")
    _check_structure(actions, pp, vpp, microbatches, forward_only)
    _check_pair_order(actions, pp)
    execute(actions, lambda action: 1.0)


def unit_cost(forward: float = 1.0, backward: float = 2.0) -> Callable[[Action], float]:
    """A cost function: every forward costs `forward`, every backward `backward`."""
    return lambda action: forward if action.kind == Kind.F else backward


def simulate(actions: Sequence[Sequence[Action]], forward: float = 1.0, backward: float = 2.0) -> Timeline:
    """Each rank's timeline, the step time and the bubble for per-chunk costs (forward, backward)."""
    return execute(actions, unit_cost(forward, backward))


def peak_live_microbatches(actions: Sequence[Action]) -> int:
    """The most (micro-batch, stage) forwards whose backward has not yet run, in list order."""
    live, peak = 0, 0
    for action in actions:
        live += 1 if action.kind == Kind.F else -1 if action.kind == Kind.B else 0
        peak = max(peak, live)
    return peak
