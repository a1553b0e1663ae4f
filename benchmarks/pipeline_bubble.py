"""Pipeline bubble: plait's GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-V and DualPipeV against
torch.distributed.pipelining's same schedules.

4 gloo ranks (spawned here, no ports). Each rank holds `--blocks` blocks whose compute is a
fixed-duration block: forward T, the input half of the backward (I) T and its weight half (W)
T, of wall time from each part's entry, its own tensor ops included (a sleep with 1 ns timer
slack to 300 us before the deadline, the block's tensor ops, then a spin to the deadline: the
2 shared cores do not blur the result, the block ends on time, and it hands over with warm
caches as a computing block would). A whole backward is I then W, 2T. The benchmark leaves
the host's settings alone unless asked: `--idle poll` keeps idle cores polling while it runs
(it holds /dev/cpu_dma_latency, needs root; see `polling_idle`).
With v chunks per rank a chunk holds blocks / v of them. For m in `--microbatches`, every
round steps each contender once, in turn (plait gpipe, plait-dist gpipe, torch gpipe, plait
1f1b, ...), so load swings hit them alike. A step is timed from a barrier to the slowest
rank's end.

Contenders: plait on its default transport (shared memory between ranks on one host),
plait on the process group's send/recv ("plait-dist", torch's transport), torch, and "bare"
(the same chunks and schedule with no runtime around them: the same split backward, no
freeing, no loss shared). With `--floor` also "floor" / "floor-dist" (the messages and waits
alone on each transport): what the machine itself charges, and what the model charges on top,
so that what is left is the runtime's.

Reported per row: the median step time (min, max), the simulator's overhead-free step time
for the same schedule (plait's simulator; it gives the same 660 and 570 ms as torch's for
the reference setting), the overhead over it ("over sim"), the overhead over the same
schedule simulated at the waits each step really had ("real-wait": sleeps overshoot on a
loaded machine, this is what is left for the runtime itself), the measured bubble (step / ideal - 1, the
ideal being m x 3T x blocks) and the theoretical bubble ((p-1)/m, (p-1)/(v m), ZB-H1's
(p-1)/(3m); the simulator's for ZB-V and DualPipeV). The summary has each zero-bubble
schedule's measured step-time saving over its 1F1B counterpart (ZB-H1 over 1F1B, ZB-V and
DualPipeV over interleaved 1F1B, v = 2) beside the saving the simulator predicts, and plait's
step over bare's.

    python benchmarks/pipeline_bubble.py --out pipeline_bubble.json
"""

import argparse
import contextlib
import ctypes
import os
import statistics
import struct
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from report import write_json  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

PP = 4
PR_SET_TIMERSLACK = 29  # prctl option (linux/prctl.h)
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zbh1", 1), ("zbv", 2), ("dualpipev", 2)]
# plait on its default transport (shared memory here), plait on the process group's send/recv, torch, the chunks
# with no runtime around them (bare); with --floor also the messages and waits alone on each transport
WHO = ("plait", "plait-dist", "torch", "bare", "floor", "floor-dist")
TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B",
                   "zbh1": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
                   "dualpipev": "ScheduleDualPipeV"}
BASELINE = {"zbh1": "1f1b", "zbv": "interleaved", "dualpipev": "interleaved"}  # the saving is reported against these


SLEPT = {"F": [], "B": []}  # the real length of each wait this step (B: each backward half): sleeps overshoot


OPS_LEAD_S = 3e-4  # a block's tensor ops start this long before its deadline (0: at its entry)
SPIN_S = 5e-5  # the last part of each wait is spun, not slept: a sleep overshoots by 20 to 70 us (see `precise_sleeps`)


def precise_sleeps() -> None:
    """This thread's timer slack to 1 ns (Linux): a sleep then ends within tens of us, not 50 us + wake-up late.

    With the default slack every wait would have to spin longer to end on time, and four
    ranks spinning at once on two cores delay each other's transitions.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


@contextlib.contextmanager
def polling_idle(enabled: bool):
    """Keep idle cores polling instead of halting while the benchmark runs (Linux PM QoS, needs root).

    Writing 0 to /dev/cpu_dma_latency asks for an idle state with no exit latency, held
    while the file stays open (what `tuned`'s latency-performance profile does). On a VM a
    halted vCPU gives its core back to the host, and the first tensor op after a 10 ms wait
    then runs from cold caches (measured here: 55 us against 16 us polling, 2 us hot), a tax
    on every transition between computes that no pipeline runtime controls. Yields what
    was done, for the report.
    """
    if not enabled:
        yield "default (not requested)"
        return
    try:
        handle = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError as error:
        yield f"default (could not hold /dev/cpu_dma_latency: {error.strerror})"
        return
    try:
        os.write(handle, struct.pack("i", 0))
        yield "poll (/dev/cpu_dma_latency held at 0)"
    finally:
        os.close(handle)


def wait_until(kind: str, start: float, seconds: float, ops=None):
    """Hold until `start + seconds` on the clock, running `ops` near the end; returns what `ops` returns.

    Sleep to `OPS_LEAD_S` before the deadline, run the block's tensor ops, spin the rest: the
    cores stay free for the other ranks while the block waits, the wait ends on time instead
    of whenever the scheduler wakes the process, and the block hands over warm, as a block
    that computed for its whole window would (the first tensor op after a 10 ms sleep runs
    from cold caches, 40x slower than hot).
    """
    deadline = start + seconds
    time.sleep(max(0.0, deadline - max(SPIN_S, OPS_LEAD_S if ops else 0.0) - time.perf_counter()))
    result = ops() if ops else None
    while time.perf_counter() < deadline:
        pass
    SLEPT[kind].append(time.perf_counter() - start)
    return result


class WaitInput(torch.autograd.Function):
    """The input path of a block: forward T, backward T (the input's grad), its tensor ops included."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return wait_until("F", time.perf_counter(), seconds, lambda: x * 1.0)

    @staticmethod
    def backward(ctx, grad):
        return wait_until("B", time.perf_counter(), ctx.seconds, lambda: grad * 1.0), None


class WaitWeight(torch.autograd.Function):
    """The weight path of a block: forward free, backward T (the weight's grad)."""

    @staticmethod
    def forward(ctx, weight, seconds):
        ctx.seconds = seconds
        return weight * 1.0

    @staticmethod
    def backward(ctx, grad):
        return wait_until("B", time.perf_counter(), ctx.seconds, lambda: grad * 1.0), None


class WaitBlock(nn.Module):
    """y = f(x) * g(w): a whole backward runs both halves (2T); split, I runs f's and W runs g's, T each."""

    def __init__(self, seconds: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.seconds = seconds

    def forward(self, x):
        return WaitInput.apply(x, self.seconds) * WaitWeight.apply(self.weight, self.seconds)


def make_chunk(blocks: int, seconds: float) -> nn.Module:
    return nn.Sequential(*[WaitBlock(seconds) for _ in range(blocks)])


def loss_fn(output, target):
    return output.float().mean()


class PlaitContender:
    def __init__(self, rank, schedule, vpp, m, args, transport="auto"):
        from plait.parallel.grid import Grid
        from plait.parallel.pipeline.runtime import PipelineRuntime

        self.chunks = [make_chunk(args.blocks // vpp, args.t_ms / 1e3) for _ in range(vpp)]
        self.runtime = PipelineRuntime(self.chunks, Grid.build(pp=PP), schedule=schedule, vpp=vpp, microbatches=m,
                                       hidden_shape=(args.micro_batch, args.hidden), prefetch=args.prefetch,
                                       transport=transport)
        self.m = m

    def step(self, x, target):
        self.runtime.run(x.view(self.m, -1, x.shape[-1]), target.view(self.m, -1, x.shape[-1]), loss_fn)
        for chunk in self.chunks:
            chunk.zero_grad(set_to_none=True)


class TorchContender:
    def __init__(self, rank, schedule, vpp, m, args):
        from torch.distributed import pipelining

        from plait.parallel.pipeline.schedule import local_stages, placement

        self.chunks = [make_chunk(args.blocks // vpp, args.t_ms / 1e3) for _ in range(vpp)]
        stages = [pipelining.PipelineStage(chunk, stage, PP * vpp, torch.device("cpu"))
                  for stage, chunk in zip(local_stages(rank, PP, vpp, placement(schedule)), self.chunks)]
        cls = getattr(pipelining, TORCH_SCHEDULES[schedule])  # shapes inferred at the first step (warm-up)
        multi = vpp > 1 or issubclass(cls, pipelining.schedules.PipelineScheduleMulti)
        self.schedule = cls(stages if multi else stages[0], m, loss_fn=loss_fn)
        self.rank = rank

    def step(self, x, target):
        if self.rank == 0:
            self.schedule.step(x, target=target, return_outputs=False)
        else:
            self.schedule.step(target=target, return_outputs=False)
        for chunk in self.chunks:
            chunk.zero_grad(set_to_none=True)


class FloorContender:
    """The schedule on one transport with no runtime around it.

    `model=False` ("floor", with `--floor`): each compute is its blocks' waits alone (no
    autograd) and each message a reused buffer of the same size: this machine's floor, in
    this hour, for any runtime on that transport. `model=True` ("bare"): the same chunks as
    plait's and torch's, forward and backward through autograd (split into I and W with the
    same `split_backward` functions where the schedule splits), with nothing beyond what the
    data needs (no freeing of sent outputs, no loss shared): what is left above it is the
    runtime's own cost; between floor and bare is the model's (its module calls, autograd
    nodes and grad accumulation), which every runtime pays. Receives are posted one compute
    ahead, like plait's on gloo; a hop between two stages of one rank (the V's turn) hands
    the tensor over.
    """

    def __init__(self, rank, schedule, vpp, m, args, transport, model=False):
        from plait.parallel.grid import Grid
        from plait.common.compat import run_backward
        from plait.parallel.pipeline.runtime import message_tag
        from plait.parallel.pipeline.schedule import (BACKWARDS, Kind, build_schedule, local_stages, matching_send,
                                                      placement, stage_ranks)
        from plait.parallel.pipeline.split_backward import backward_input, backward_weight
        from plait.parallel.pipeline.transport import choose_transport

        grid = Grid.build(pp=PP)
        peers = [grid.pp_peer(offset) for offset in range(PP)]
        to_global = [grid.peer(pp=r) for r in range(PP)]
        ranks = stage_ranks(PP, vpp, placement(schedule))
        self.shape, self.m, self.model, self.last = (args.micro_batch, args.hidden), m, model, PP * vpp - 1
        self.message = torch.zeros(self.shape)  # floor: every send carries it, every receive lands in it
        self.post, _ = choose_transport(transport, grid.pp_group, "gloo", rank, peers, slot_bytes=self.message.nbytes,
                                        microbatches=m, pp=PP, vpp=vpp)
        self.backward_from = run_backward  # the engine entry plait's runtime calls (its output may be freed)
        self.backward_input, self.backward_weight = backward_input, backward_weight
        self.chunks = {stage: make_chunk(args.blocks // vpp, args.t_ms / 1e3)
                       for stage in local_stages(rank, PP, vpp, placement(schedule))}
        self.loss_grad = torch.full((), 1.0 / m)
        seconds = {Kind.F: 1, Kind.B: 2, Kind.I: 1, Kind.W: 1}
        # ("compute", kind, mb, stage, waits, hand) | ("send", peer, tag, forward?, key) | ("recv", key, peer, tag)
        self.plan = []
        for action in build_schedule(schedule, PP, vpp, m, prefetch=1)[rank]:
            forward = action.kind in (Kind.F, Kind.SEND_F, Kind.RECV_F)
            stage = action.stage
            if action.kind in seconds:
                waits = [args.t_ms / 1e3 * seconds[action.kind]] * (args.blocks // vpp)
                hand = (stage < self.last and ranks[stage + 1] == rank) if forward else \
                    (stage > 0 and ranks[stage - 1] == rank)  # the neighbour stage is on this rank
                self.plan.append(("compute", action.kind.value, action.microbatch, stage, waits, hand))
            elif action.kind in (Kind.SEND_F, Kind.SEND_B):
                peer = to_global[ranks[stage + 1 if forward else stage - 1]]
                self.plan.append(("send", peer, message_tag(action, m, PP * vpp), forward, (action.microbatch, stage)))
            else:
                send = matching_send(action)
                self.plan.append(("recv", (forward, action.microbatch, stage), to_global[ranks[send.stage]],
                                  message_tag(send, m, PP * vpp)))
        self.backwards = {kind.value for kind in BACKWARDS}

    def step(self, x, target):
        inputs = x.view(self.m, -1, x.shape[-1])
        received, sent, outputs, kept, grads, pending = {}, [], {}, {}, {}, {}
        for op in self.plan:
            if op[0] == "compute":
                _, kind, mb, stage, waits, hand = op
                key = (kind == "F", mb, stage)
                data = None
                if key in received:
                    work, data = received.pop(key)
                    work.wait()
                if not self.model:
                    for seconds in waits:
                        wait_until("F" if kind == "F" else "B", time.perf_counter(), seconds)
                elif kind == "F":
                    data = inputs[mb] if data is None else data
                    output = self.chunks[stage](data)
                    outputs[(mb, stage)] = loss_fn(output, None) if stage == self.last else output
                    kept[(mb, stage)] = data
                    if hand:
                        received[(True, mb, stage + 1)] = (SENT_HERE, output.detach().requires_grad_())
                elif kind == "W":
                    self.backward_weight(pending.pop((mb, stage)))
                else:
                    output, grad = outputs.pop((mb, stage)), self.loss_grad if data is None else data
                    x_in = kept.pop((mb, stage))
                    if kind == "B":
                        self.backward_from(output, grad)
                    else:
                        pending[(mb, stage)] = self.backward_input(output, grad, [x_in], list(
                            self.chunks[stage].parameters()))
                    if hand:
                        received[(False, mb, stage - 1)] = (SENT_HERE, x_in.grad)
                    elif stage > 0:
                        grads[(mb, stage)] = x_in.grad
            elif op[0] == "send":
                _, peer, tag, forward, key = op
                tensor = (outputs[key] if forward else grads.pop(key)) if self.model else self.message
                sent += self.post((), [(tensor, peer, tag)])
            else:
                _, key, peer, tag = op
                buffer = torch.empty(self.shape, requires_grad=key[0]) if self.model else self.message
                received[key] = (self.post([(buffer, peer, tag)], ())[0], buffer)
        for work in sent:
            work.wait()
        for chunk in self.chunks.values():
            chunk.zero_grad(set_to_none=True)


class _Here:
    """A tensor handed over on this rank: nothing to wait for."""

    def wait(self):
        return True


SENT_HERE = _Here()


def chosen(args):
    return [(name, vpp) for name, vpp in SCHEDULES if name in args.schedules]


def timed(contender, x, target):
    """(step time of the slowest rank, mean real forward wait, mean real backward wait) in seconds."""
    SLEPT["F"].clear()
    SLEPT["B"].clear()
    dist.barrier()
    start = time.perf_counter()
    contender.step(x, target)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    slept = torch.tensor([sum(SLEPT["F"]), len(SLEPT["F"]), sum(SLEPT["B"]), len(SLEPT["B"])], dtype=torch.float64)
    dist.all_reduce(slept)
    return float(elapsed), float(slept[0] / slept[1]), float(slept[2] / slept[3])


def worker(rank, store_path, args, queue):
    global SPIN_S, OPS_LEAD_S
    SPIN_S, OPS_LEAD_S = args.spin_us * 1e-6, args.ops_lead_us * 1e-6
    torch.set_num_threads(1)
    precise_sleeps()
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=PP)
    results = {}
    try:
        for m in args.microbatches:
            contenders = {}
            for schedule, vpp in chosen(args):
                contenders[("plait", schedule)] = PlaitContender(rank, schedule, vpp, m, args)
                contenders[("plait-dist", schedule)] = PlaitContender(rank, schedule, vpp, m, args, "dist")
                contenders[("torch", schedule)] = TorchContender(rank, schedule, vpp, m, args)
                contenders[("bare", schedule)] = FloorContender(rank, schedule, vpp, m, args, "auto", model=True)
                if args.floor:
                    contenders[("floor", schedule)] = FloorContender(rank, schedule, vpp, m, args, "auto")
                    contenders[("floor-dist", schedule)] = FloorContender(rank, schedule, vpp, m, args, "dist")
            x = torch.randn(m * args.micro_batch, args.hidden, generator=torch.Generator().manual_seed(m))
            target = torch.zeros_like(x)
            for _ in range(args.warmup):
                for contender in contenders.values():
                    timed(contender, x, target)
            times = {key: [] for key in contenders}
            for _ in range(args.rounds):
                for key, contender in contenders.items():
                    times[key].append(timed(contender, x, target))
            results[m] = times
    finally:
        dist.destroy_process_group()
    if rank == 0:
        queue.put(results)


def theory_bubble(schedule: str, vpp: int, m: int, simulated: float) -> float:
    """(p-1)/m (GPipe, 1F1B), (p-1)/(v m) (interleaved), (p-1)/(3m) (ZB-H1 at F = I = W), else the simulator's."""
    if schedule in ("gpipe", "1f1b"):
        return (PP - 1) / m
    if schedule == "interleaved":
        return (PP - 1) / (vpp * m)
    if schedule == "zbh1":
        return (PP - 1) / (3 * m)
    return simulated


def report(results, args, idle: str) -> dict:
    from plait.parallel.pipeline.schedule import build_schedule
    from plait.parallel.pipeline.simulate import simulate

    t = args.t_ms
    rows, summary, step_of, sim_of = [], {}, {}, {}
    header = (f"{'m':>3} {'schedule':<12} {'who':<10} {'median ms':>10} {'min':>8} {'max':>8} {'sim ms':>8} "
              f"{'over sim':>9} {'real-wait':>9} {'bubble':>7} {'theory':>7}")
    lines = [header, "-" * len(header)]
    for m, times in results.items():
        for schedule, vpp in chosen(args):
            actions = build_schedule(schedule, PP, vpp, m)
            per_chunk = t * args.blocks / vpp
            sim = simulate(actions, per_chunk, 2 * per_chunk, per_chunk)  # F = I = W = T per block
            ideal = m * 3 * t * args.blocks
            theory = theory_bubble(schedule, vpp, m, sim.bubble_fraction)
            medians, excess = {}, {}
            for who in [who for who in WHO if (who, schedule) in times]:
                samples = [1e3 * step for step, _, _ in times[(who, schedule)]]
                # the same schedule simulated at the waits this step really had: what is left is runtime overhead
                # (b: the mean real wait of one backward half, I or W)
                at_real = [step / simulate(actions, f * args.blocks / vpp, 2 * b * args.blocks / vpp,
                                           b * args.blocks / vpp).step_time - 1
                           for step, f, b in times[(who, schedule)]]
                median = statistics.median(samples)
                medians[who], excess[who] = median, statistics.median(at_real)
                row = dict(m=m, schedule=schedule, vpp=vpp, contender=who, median_ms=median, min_ms=min(samples),
                           max_ms=max(samples), simulated_ms=sim.step_time, over_simulated=median / sim.step_time - 1,
                           over_simulated_at_real_waits=excess[who],
                           real_forward_wait_ms=statistics.median(1e3 * f for _, f, _ in times[(who, schedule)]),
                           measured_bubble=median / ideal - 1, theoretical_bubble=theory,
                           simulated_bubble=sim.bubble_fraction)
                rows.append(row)
                lines.append(f"{m:>3} {schedule:<12} {who:<10} {median:>10.1f} {min(samples):>8.1f} {max(samples):>8.1f} "
                             f"{sim.step_time:>8.1f} {100 * row['over_simulated']:>8.1f}% "
                             f"{100 * excess[who]:>8.1f}% {row['measured_bubble']:>7.3f} {theory:>7.3f}")
            summary[f"m{m}_{schedule}_plait_over_sim"] = medians["plait"] / sim.step_time - 1
            summary[f"m{m}_{schedule}_torch_over_sim"] = medians["torch"] / sim.step_time - 1
            summary[f"m{m}_{schedule}_plait_over_sim_at_real_waits"] = excess["plait"]
            summary[f"m{m}_{schedule}_torch_over_sim_at_real_waits"] = excess["torch"]
            summary[f"m{m}_{schedule}_plait_dist_over_sim"] = medians["plait-dist"] / sim.step_time - 1
            summary[f"m{m}_{schedule}_torch_over_plait"] = medians["torch"] / medians["plait"]
            summary[f"m{m}_{schedule}_torch_over_plait_dist"] = medians["torch"] / medians["plait-dist"]
            summary[f"m{m}_{schedule}_plait_over_bare"] = medians["plait"] / medians["bare"]
            step_of[(m, schedule)], sim_of[(m, schedule)] = medians, sim.step_time
            baseline = BASELINE.get(schedule)
            if baseline is not None and (m, baseline) in step_of:  # the baselines come first in SCHEDULES
                predicted = 1 - sim.step_time / sim_of[(m, baseline)]
                for who in ("plait", "torch", "bare"):  # bare: what the machine and model allow with no runtime
                    saving = 1 - medians[who] / step_of[(m, baseline)][who]
                    summary[f"m{m}_{schedule}_{who}_saving_over_{baseline}"] = saving
                    summary[f"m{m}_{schedule}_{who}_saving_over_predicted"] = saving / predicted
                summary[f"m{m}_{schedule}_predicted_saving_over_{baseline}"] = predicted
                lines.append(f"{'':>3} {schedule:<12} saves {100 * (1 - medians['plait'] / step_of[(m, baseline)]['plait']):.1f}% "
                             f"of plait's {baseline} step (simulator: {100 * predicted:.1f}%)")
            for floor in ("bare", "floor", "floor-dist"):
                if floor in medians:
                    summary[f"m{m}_{schedule}_{floor.replace('-', '_')}_over_sim"] = medians[floor] / sim.step_time - 1
            lines.append(f"{'':>3} {schedule:<12} torch / plait = {medians['torch'] / medians['plait']:.3f}, "
                         f"torch / plait-dist = {medians['torch'] / medians['plait-dist']:.3f}, "
                         f"plait / bare = {medians['plait'] / medians['bare']:.3f}")
    print("\n".join(lines))
    return {"benchmark": "pipeline_bubble", "device": "cpu, 4 gloo ranks, compute as sleeps",
            "settings": dict(pp=PP, t_ms=t, blocks_per_rank=args.blocks, rounds=args.rounds, warmup=args.warmup,
                             micro_batch=args.micro_batch, hidden=args.hidden, idle=idle, spin_ms=1e-3 * args.spin_us,
                             ops_lead_ms=1e-3 * args.ops_lead_us),
            "rows": rows, "summary": summary}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t-ms", type=float, default=10.0,
                        help="forward time of one block (each backward half, I and W, the same)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per rank")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--schedules", nargs="+", default=[name for name, _ in SCHEDULES],
                        help="which schedules to run (a zero-bubble one's saving needs its baseline too)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ops-lead-us", type=float, default=1e6 * OPS_LEAD_S,
                        help="run each block's tensor ops this many microseconds before its deadline (0: at its entry)")
    parser.add_argument("--spin-us", type=float, default=1e6 * SPIN_S,
                        help="each wait spins this many microseconds before its deadline instead of sleeping")
    parser.add_argument("--floor", action="store_true",
                        help="also run the messages and waits alone on each transport (floor, floor-dist)")
    parser.add_argument("--prefetch", type=int, default=None, help="plait: receives posted this many computes ahead "
                        "(default: the runtime's choice, 1 on gloo)")
    parser.add_argument("--idle", choices=["poll", "default"], default="default",
                        help="default: leave the host alone; poll: hold /dev/cpu_dma_latency at 0 while the benchmark "
                             "runs so idle cores poll (PM QoS, needs root; falls back to default)")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp, polling_idle(args.idle == "poll") as idle:
        print(f"idle cores: {idle}")
        store = os.path.join(tmp, "store")
        processes = [context.Process(target=worker, args=(r, store, args, queue)) for r in range(PP)]
        for process in processes:
            process.start()
        results = None
        while results is None:
            try:
                results = queue.get(timeout=5)
            except Exception:  # queue.Empty: stop waiting once any rank has died
                if any(p.exitcode not in (None, 0) for p in processes):
                    for process in processes:
                        process.kill()
                    raise SystemExit("a rank failed; see its traceback above")
        for process in processes:
            process.join()
    payload = report(results, args, idle)
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
