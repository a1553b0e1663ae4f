"""Pipeline schedules as data: each pp rank's ordered list of actions.

An action is (kind, micro-batch, stage). `stage` is the *virtual* stage: the model is cut
into p x v chunks in model order. Where a stage runs is the schedule's placement:

- "loop" (GPipe, 1F1B, interleaved 1F1B, ZB-H1): stage k on pp rank k mod p (Megatron's
  interleaving: rank r holds chunks r, r + p, r + 2p, ...);
- "v" (ZB-V, DualPipeV; two chunks per rank): rank r holds stages r and 2p - 1 - r, so the
  model goes down the ranks and comes back up; the hop from stage p - 1 to p stays on rank
  p - 1 and the last stage (the loss) is on rank 0, beside the embedding.

Kinds:

- F: forward of one micro-batch through one chunk;
- B: its whole backward (input grad and weight grads together);
- I and W, the backward split in two (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR
  2024, where they are called B and W): I computes the grad of the chunk's input only, the
  one the previous stage waits for; W computes the weight grads later, from what I kept,
  where the rank would otherwise idle;
- SEND_F(mb, s): send stage s's output to stage s + 1; RECV_F(mb, s): receive stage s's input;
- SEND_B(mb, s): send the grad of stage s's input to stage s - 1; RECV_B(mb, s): receive
  the grad of stage s's output. (B and I send the input grad; W sends nothing. A hop
  between two stages on one rank has no message: the runtime hands the tensor over.)

A schedule is built in two passes, like `torch.distributed.pipelining`: the compute order
(`compute_order`), then `lower` adds the communication around each compute action: a
compute's sends right after it, its receives posted before it (right before it, or one or
more computes ahead with `prefetch`), and the runtime issues each run of consecutive
communication actions as one batched isend/irecv (so after a forward, "send my output" and
"receive the next backward's grad" go out together, Megatron's send_forward_recv_backward).
A RECV action posts the buffer; the compute that needs the data waits for it.

Allowed micro-batch counts m: any m >= 1 for GPipe, 1F1B, interleaved 1F1B, ZB-H1 and
ZB-V. Interleaved 1F1B walks the chunks in groups of at least p micro-batches (p forwards
on chunk 0, then p on chunk 1, ...; Megatron's rounds of p when p divides m, else m // p
groups of near-equal size, the larger first), so that the first micro-batch of a group
comes back around the ring by the time the group on the previous chunk ends; with m < p
there is one group and chunks wait for the ring (a larger bubble, as 1F1B's with m < p).
DualPipeV needs m >= 2p (its steady phase pairs every forward with a backward).
"""

from dataclasses import dataclass
from enum import Enum
from itertools import accumulate
from typing import Callable, Dict, List, Sequence, Tuple


class ScheduleError(ValueError):
    """A schedule that cannot be built or would not run, explained in one sentence."""


class Kind(str, Enum):
    F = "F"
    B = "B"
    I = "I"  # noqa: E741 (torch's and the paper's letter for the input half of a backward)
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMPUTE = (Kind.F, Kind.B, Kind.I, Kind.W)
BACKWARDS = (Kind.B, Kind.I)  # the computes that produce the input's grad (and consume the output's)


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


def splits_backward(parallel) -> bool:
    """Whether the `parallel` config's step splits each backward into an input and a weight half (a zero-bubble
    schedule at pp > 1; one stage runs every micro-batch's backward whole). The one place the trainer, the
    config's checks and `plait plan` ask it."""
    return parallel.pp > 1 and schedule_name(parallel.schedule, parallel.vpp) in SPLIT_SCHEDULES


def placement(schedule: str) -> str:
    """Where a schedule's stages run: "v" for ZB-V and DualPipeV, else "loop"."""
    return "v" if schedule in V_SCHEDULES else "loop"


def chunks_per_rank(schedule: str, vpp: int) -> int:
    """How many chunks each rank holds: 2 for the V schedules (whatever vpp says), else vpp."""
    return 2 if schedule in V_SCHEDULES else vpp


def stage_ranks(pp: int, vpp: int, style: str = "loop") -> List[int]:
    """The pp rank of each virtual stage: k mod p ("loop"), or down the ranks and back up ("v", vpp = 2)."""
    if style == "v":
        return list(range(pp)) + list(reversed(range(pp)))
    return [k % pp for k in range(pp * vpp)]


def local_stages(pp_rank: int, pp: int, vpp: int, style: str = "loop") -> List[int]:
    """The virtual stages held by `pp_rank`, in model order (its chunks 0..v-1)."""
    return [stage for stage, rank in enumerate(stage_ranks(pp, vpp, style)) if rank == pp_rank]


def check_microbatches(schedule: str, pp: int, vpp: int, microbatches: int) -> None:
    """Raise ScheduleError (one sentence naming the setting and the fix) for counts the schedule rejects."""
    if schedule not in BUILDERS:
        raise ScheduleError(f"parallel.schedule={schedule} is not one of {', '.join(BUILDERS)} "
                            f"(1f1b with parallel.vpp > 1 interleaves).")
    for name, value in (("parallel.pp", pp), ("parallel.vpp", vpp), ("parallel.microbatches", microbatches)):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name}={value} must be a positive integer.")
    if schedule in ("1f1b", "zbh1") and vpp != 1:
        raise ScheduleError(f"the {schedule} schedule runs one chunk per rank but parallel.vpp={vpp}; "
                            f"use the interleaved schedule (1f1b with vpp > 1) or zbv.")
    if schedule in V_SCHEDULES and vpp != 2:
        raise ScheduleError(f"the {schedule} schedule runs two chunks per rank (a V) but parallel.vpp={vpp}; "
                            f"set parallel.vpp=2 (or leave it at 1, read as 2).")
    if schedule == "dualpipev" and microbatches < 2 * pp:
        raise ScheduleError(f"dualpipev needs parallel.microbatches={microbatches} to be at least 2 x parallel.pp "
                            f"= {2 * pp} (its steady phase pairs each forward with a backward); use {2 * pp} or more.")


def _gpipe(rank: int, pp: int, vpp: int, m: int, forward_only: bool) -> List[Action]:
    stages = local_stages(rank, pp, vpp)
    order = [Action(Kind.F, mb, s) for s in stages for mb in range(m)]
    if not forward_only:
        order += [Action(Kind.B, mb, s) for s in reversed(stages) for mb in range(m)]
    return order


def _one_f_one_b(rank: int, pp: int, m: int, backward: Kind = Kind.B) -> List[Action]:
    """Warm-up forwards (p - r - 1), then one forward / one backward, then the remaining backwards."""
    warmup = min(pp - rank - 1, m)
    order = [Action(Kind.F, mb, rank) for mb in range(warmup)]
    for index in range(m - warmup):
        order += [Action(Kind.F, warmup + index, rank), Action(backward, index, rank)]
    order += [Action(backward, mb, rank) for mb in range(m - warmup, m)]
    return order


def _zb_h1(rank: int, pp: int, m: int) -> List[Action]:
    """ZB-H1 (Qi et al. 2024, section 3.1): 1F1B's order of F and I, each W deferred by `rank` backwards.

    Rank r runs its first r input-backwards without their W (the bubble 1F1B leaves at its
    tail grows with r), then a W after every I, then the deferred ones at the end, where 1F1B
    idles. The forwards in flight are 1F1B's (p - r warm-up); their activations live r
    backwards longer, so every rank holds at most p micro-batches, 1F1B's peak (rank 0's).
    With T_F = T_B = T_W the bubble is (p - 1)(T_F + T_B - T_W) against 1F1B's
    (p - 1)(T_F + T_B + T_W): a third.
    """
    order: List[Action] = []
    weights = 0
    for action in _one_f_one_b(rank, pp, m, backward=Kind.I):
        order.append(action)
        if action.kind == Kind.I and action.microbatch >= rank:
            order.append(Action(Kind.W, weights, rank))
            weights += 1
    return order + [Action(Kind.W, mb, rank) for mb in range(weights, m)]


def _zb_v(rank: int, pp: int, m: int) -> List[Action]:
    """ZB-V (Qi et al. 2024, section 6): two chunks per rank in a V, F = I = W in steady state.

    Rank r holds stage r (chunk 0, going down) and 2p - 1 - r (chunk 1, coming back up).
    Warm-up: 2(p - r) - 1 forwards of chunk 0, r pairs (F chunk 1, F chunk 0), p - r rounds
    of (F, I, W) on chunk 1. Steady: (F, I, W) on chunk 0 then on chunk 1. Cool-down: r pairs
    of I (chunk 0, chunk 1), p - r of (I, W) on chunk 0, then the remaining W's. Built for
    max(m, 2p - 1) micro-batches (the shortest run whose warm-up fills the V) and cut back to
    m, as torch's `ScheduleZBVZeroBubble` does; the validator checks the result.
    """
    n = max(m, 2 * pp - 1)
    down, up = rank, 2 * pp - 1 - rank
    counts = {(kind, stage): 0 for kind in COMPUTE for stage in (down, up)}
    order: List[Action] = []

    def add(*computes: Tuple[Kind, int]) -> None:
        """Each (kind, stage) in turn, on the next micro-batch of that kind and stage."""
        for kind, stage in computes:
            order.append(Action(kind, counts[(kind, stage)], stage))
            counts[(kind, stage)] += 1

    F, I, W = Kind.F, Kind.I, Kind.W  # noqa: E741
    for _ in range(2 * (pp - rank) - 1):  # warm-up: down the V,
        add((F, down))
    for _ in range(rank):  # the turn,
        add((F, up), (F, down))
    for _ in range(pp - rank):  # and the first micro-batches back up, whole
        add((F, up), (I, up), (W, up))
    while counts[(F, up)] < counts[(F, down)] or counts[(F, down)] < n:  # steady
        if counts[(F, down)] < n:
            add((F, down))
        add((I, down), (W, down), (F, up), (I, up), (W, up))
    for _ in range(rank):  # cool-down
        add((I, down), (I, up))
    for _ in range(pp - rank):
        add((I, down), (W, down))
    add(*[(W, up)] * (counts[(I, up)] - counts[(W, up)]))
    add(*[(W, down)] * (counts[(I, down)] - counts[(W, down)]))
    return [action for action in order if action.microbatch < m]


def _dualpipe_v(rank: int, pp: int, m: int) -> List[Action]:
    """DualPipeV (DeepSeek-V3, arXiv 2412.19437; the V-shaped half of DualPipe), as torch 2.13 orders it.

    Rank r holds stages r (chunk 0) and 2p - 1 - r (chunk 1). Eight phases: forwards of chunk 0;
    pairs (F chunk 0, F chunk 1); (I chunk 1, a pending W, F chunk 1); the main phase of
    forward-backward pairs, chunk 0's forward with chunk 1's backward, then chunk 1's with
    chunk 0's (DeepSeek overlaps the two computes of a pair; here they run one after the
    other); (B chunk 1, F chunk 1 with B chunk 0); the last backwards of both chunks, split
    into I with its W deferred from the middle on; then (W, I chunk 0) and the pending W's.
    Needs m >= 2p.
    """
    down, up = rank, 2 * pp - 1 - rank
    forwards = {down: 0, up: 0}
    backwards = {down: 0, up: 0}
    pending: List[Action] = []
    order: List[Action] = []

    def forward(stage: int) -> None:
        order.append(Action(Kind.F, forwards[stage], stage))
        forwards[stage] += 1

    def backward(stage: int, split: bool) -> None:
        mb = backwards[stage]
        backwards[stage] += 1
        order.append(Action(Kind.I if split else Kind.B, mb, stage))
        if split:
            pending.append(Action(Kind.W, mb, stage))

    def weight() -> None:
        if pending:
            order.append(pending.pop(0))

    for _ in range((pp - rank - 1) * 2):
        forward(down)
    for _ in range(rank + 1):
        forward(down)
        forward(up)
    for _ in range(pp - rank - 1):
        backward(up, split=True)
        weight()
        forward(up)
    for step in range(m - 2 * pp + rank + 1):
        forward(down)  # (the last rank's first pair is not overlapped in DeepSeek's order; same sequence here)
        backward(up, split=False)
        forward(up)
        backward(down, split=False)
    for _ in range(pp - rank - 1):
        backward(up, split=False)
        forward(up)
        backward(down, split=False)
    split = False
    for index in range(rank + 1):
        if index == (rank + 1) // 2 and rank % 2 == 1:
            split = True
        backward(up, split)
        if index == (rank + 1) // 2 and rank % 2 == 0:
            split = True
        backward(down, split)
    for _ in range(pp - rank - 1):
        weight()
        backward(down, split)
    while pending:
        weight()
    return order


# schedule name -> the compute order of one pp rank (rank, pp, vpp, m); the keys are the choices
BUILDERS: Dict[str, Callable[[int, int, int, int], List[Action]]] = {
    "gpipe": lambda rank, pp, vpp, m: _gpipe(rank, pp, vpp, m, forward_only=False),
    "1f1b": lambda rank, pp, vpp, m: _one_f_one_b(rank, pp, m),
    "interleaved": lambda rank, pp, vpp, m: _interleaved(rank, pp, vpp, m),
    "zbh1": lambda rank, pp, vpp, m: _zb_h1(rank, pp, m),
    "zbv": lambda rank, pp, vpp, m: _zb_v(rank, pp, m),
    "dualpipev": lambda rank, pp, vpp, m: _dualpipe_v(rank, pp, m),
}
V_SCHEDULES = ("zbv", "dualpipev")  # two chunks per rank, placed in a V
SPLIT_SCHEDULES = ("zbh1", "zbv", "dualpipev")  # backwards split in I and W (zero-bubble)


def microbatch_groups(pp: int, m: int) -> List[int]:
    """How interleaved 1F1B splits m micro-batches into the groups it walks through each chunk.

    max(1, m // p) groups of near-equal size, the larger first: each holds at least p
    micro-batches when m >= p (so the first of a group is back around the ring when the
    group's previous chunk ends) and the first is the largest (the warm-up covers it).
    With m a multiple of p these are Megatron's rounds of p.
    """
    count = max(1, m // pp)
    return [m // count + (1 if index < m % count else 0) for index in range(count)]


def _interleaved(rank: int, pp: int, vpp: int, m: int, sizes: Sequence[int] = ()) -> List[Action]:
    """Megatron's interleaved 1F1B: the k-th forward (backward) of a rank is a fixed (chunk, mb).

    Forwards walk each group of micro-batches (`microbatch_groups`) through the chunks 0 to
    v-1, group after group; backwards the same with the chunks reversed. Warm-up:
    (p - r - 1) * 2 + (v - 1) * g forwards, g the first group's size, capped at m v.
    `sizes` replaces the groups (tests show why others fail).
    """
    sizes = list(sizes) or microbatch_groups(pp, m)
    table = [(mb, chunk) for first, size in zip(accumulate([0] + sizes), sizes)
             for chunk in range(vpp) for mb in range(first, first + size)]
    forwards = [Action(Kind.F, mb, rank + chunk * pp) for mb, chunk in table]
    backwards = [Action(Kind.B, mb, rank + (vpp - 1 - chunk) * pp) for mb, chunk in table]
    total = m * vpp
    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * sizes[0], total)
    order = forwards[:warmup]
    for k in range(total - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[total - warmup:]


def compute_order(schedule: str, pp: int, vpp: int, microbatches: int, *, forward_only: bool = False) -> List[List[Action]]:
    """Each rank's forwards and backwards in execution order (no communication yet)."""
    check_microbatches(schedule, pp, vpp, microbatches)
    if forward_only:
        ranks = stage_ranks(pp, vpp, placement(schedule))
        return [[Action(Kind.F, mb, s) for s in range(pp * vpp) if ranks[s] == r for mb in range(microbatches)]
                for r in range(pp)]
    return [BUILDERS[schedule](r, pp, vpp, microbatches) for r in range(pp)]


def matching_send(recv: Action) -> Action:
    """The send a receive waits for: stage s's input comes from s-1's output, its output grad from s+1."""
    if recv.kind == Kind.RECV_F:
        return Action(Kind.SEND_F, recv.microbatch, recv.stage - 1)
    return Action(Kind.SEND_B, recv.microbatch, recv.stage + 1)


def matching_recv(send: Action) -> Action:
    """The receive a send is matched with."""
    if send.kind == Kind.SEND_F:
        return Action(Kind.RECV_F, send.microbatch, send.stage + 1)
    return Action(Kind.RECV_B, send.microbatch, send.stage - 1)


def peer_of(action: Action, ranks) -> int:
    """The rank at the other end of a send or receive (`ranks[s]`: the rank of stage s, a list or a dict)."""
    return ranks[action.stage + (1 if action.kind in (Kind.SEND_F, Kind.RECV_B) else -1)]


def receives_of(action: Action, ranks) -> List[Action]:
    """The receives a compute reads: a forward's input, a backward's output grad, when they cross ranks."""
    stage = action.stage
    if action.kind == Kind.F and stage > 0 and ranks[stage - 1] != ranks[stage]:
        return [Action(Kind.RECV_F, action.microbatch, stage)]
    if action.kind in BACKWARDS and stage < len(ranks) - 1 and ranks[stage + 1] != ranks[stage]:
        return [Action(Kind.RECV_B, action.microbatch, stage)]
    return []


def _sends(action: Action, ranks: Sequence[int]) -> List[Action]:
    stage = action.stage
    if action.kind == Kind.F and stage < len(ranks) - 1 and ranks[stage + 1] != ranks[stage]:
        return [Action(Kind.SEND_F, action.microbatch, stage)]
    if action.kind in BACKWARDS and stage > 0 and ranks[stage - 1] != ranks[stage]:
        return [Action(Kind.SEND_B, action.microbatch, stage)]
    return []


def lower(order: Sequence[Action], ranks: Sequence[int], prefetch: int = 0) -> List[Action]:
    """Add communication: each compute's sends right after it, its receives posted before it.

    `ranks[s]` is the pp rank of stage s. A receive only posts the buffer; the compute that
    needs it waits for the data. With `prefetch` k, the receives of compute i + k + 1 are
    posted right after compute i (before compute i + 1 runs), so the data can arrive while
    compute i + 1 runs instead of after it.
    """
    actions: List[Action] = []
    for action in order[:prefetch + 1]:
        actions += receives_of(action, ranks)
    for index, action in enumerate(order):
        actions.append(action)
        actions += _sends(action, ranks)
        if index + prefetch + 1 < len(order):
            actions += receives_of(order[index + prefetch + 1], ranks)
    return actions


def build_schedule(schedule: str, pp: int, vpp: int, microbatches: int, *,
                   forward_only: bool = False, prefetch: int = 0) -> List[List[Action]]:
    """Each pp rank's full action list (compute and communication) for one step.

    `schedule` is one of BUILDERS (1f1b with vpp > 1 is read as interleaved). `forward_only`
    gives the forwards in GPipe's order (evaluation). `prefetch`: how many computes ahead
    receives are posted (see `lower`).
    """
    schedule = schedule_name(schedule, vpp)
    ranks = stage_ranks(pp, vpp, placement(schedule))
    lowered = [lower(order, ranks, prefetch)
               for order in compute_order(schedule, pp, vpp, microbatches, forward_only=forward_only)]
    return [post_in_send_order(lowered, rank, ranks) for rank in range(pp)]


def post_in_send_order(lowered: Sequence[Sequence[Action]], rank: int, ranks: Sequence[int]) -> List[Action]:
    """`rank`'s list with, for each peer, its receives posted in the order the peer sends them.

    NCCL matches messages between two ranks by order. Under a V both directions of a link
    carry two streams (one chunk's activations, the other chunk's grads), and a rank may
    need them in another order than its peer sends them. A receive only posts a buffer, so
    it may be posted earlier: each is moved up to the latest slot that keeps both its own
    compute after it and the peer's order (a suffix minimum over the positions). Schedules
    whose orders already agree come back unchanged.
    """
    actions = list(lowered[rank])
    receive_kinds = (Kind.RECV_F, Kind.RECV_B)
    for peer in sorted({peer_of(a, ranks) for a in actions if a.kind in receive_kinds}):
        position = {a: i for i, a in enumerate(actions) if a.kind in receive_kinds and peer_of(a, ranks) == peer}
        sent = [matching_recv(a) for a in lowered[peer]
                if a.kind in (Kind.SEND_F, Kind.SEND_B) and peer_of(a, ranks) == rank]
        if sorted(position, key=position.get) == sent:
            continue
        slot, latest = {}, len(actions)
        for receive in reversed(sent):
            latest = min(latest, position[receive])
            slot.setdefault(latest, []).insert(0, receive)
        reordered: List[Action] = []
        for index, action in enumerate(actions):
            reordered += slot.get(index, [])
            if action not in position:
                reordered.append(action)
        actions = reordered
    return actions


def format_schedule(actions: Sequence[Sequence[Action]]) -> str:
    """One line per rank: its actions in order (for logs and error messages)."""
    return "\n".join(f"rank {r}: " + " ".join(map(repr, rank_actions)) for r, rank_actions in enumerate(actions))
