"""How many bytes does each tensor-parallel rank send per training step, and is that what the
scheme promises? Measured (every collective wrapped and counted) against analytic.

Megatron's scheme, per transformer layer and micro-batch of b x s tokens and width h:
two all-reduces of b*s*h elements forward (after attention and after the MLP) and two
backward (before the Q|K|V and gate|up matmuls); with sequence parallelism the same volume
as all-gathers and reduce-scatters. Bytes are the ring algorithm's per rank: an all-reduce
of N elements sends 2(t-1)/t N, an all-gather or reduce-scatter of N (full size) (t-1)/t N.
Outside the layers: the vocab-parallel embedding and head each move one all-reduce
equivalent, the loss three small all-reduces of b*s, and under sequence parallelism the
replicated norm gains' grads are summed once per step. Each is its own row, so the layer
ratio is honest: 1.0 means no hidden extra communication.

    python benchmarks/tp_comm.py --tp 2 --out tp_comm.json

With `parallel.tp_overlap` (the default at tp > 1) each column-parallel layer's backward
overlaps its collective with its weight-grad GEMM and, under SP, re-gathers its input from
this rank's shard instead of keeping it whole: one more all-gather per column-parallel layer
(two per layer, one for an untied head), which the analytic rows count.

The four contenders (sequence parallelism off and on, tp_overlap off and on) run in the same
ranks, stepped in turn round by round; byte counts are deterministic, step times are medians
(min, max) on a shared, noisy CPU and mean little there.
"""

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict

CONTENDERS = ((False, False), (False, True), (True, False), (True, True))  # (sequence_parallel, tp_overlap)
ROW_ORDER = ("layers", "embedding", "head", "loss", "norm grads (SP)", "grad norm", "other")


# counting --------------------------------------------------------------------------------
class Recorder:
    """Every collective this rank issues during a counted step: (label, kind, group size, bytes sent)."""

    def __init__(self):
        self.label = None
        self.counting = False
        self.calls = []

    def add(self, kind, tensor_elements, element_size, group):
        import torch.distributed as dist

        if not self.counting:
            return
        size = dist.get_world_size(group)
        share = (size - 1) / size
        sent = (2 * share if kind == "all_reduce" else share) * tensor_elements * element_size
        self.calls.append((self.label or _label_from_stack(), kind, size, sent, group))


def _label_from_stack():
    names = {frame.function for frame in inspect.stack()[2:40]}
    if names & {"allreduce_partial_grads", "all_reduce_coalesced"}:  # at dp=1 only the SP norm grads use it
        return "norm grads (SP)"
    if "global_grad_norm" in names:
        return "grad norm"
    return "other"


def install_counters(recorder):
    """Wrap torch.distributed's collectives (and the aliases plait.common.collectives bound) to count bytes."""
    import torch.distributed as dist

    from plait.common import collectives as T

    def wrap(original, kind, elements_of):
        def counted(*args, **kwargs):
            tensor, n = elements_of(*args, **kwargs)
            recorder.add(kind, n, tensor.element_size(), kwargs.get("group"))
            return original(*args, **kwargs)
        return counted

    full_out = lambda out, inp, **k: (out, out.numel())  # all-gather: output size; reduce-scatter: input size
    full_in = lambda out, inp, **k: (inp, inp.numel())
    dist.all_reduce = wrap(dist.all_reduce, "all_reduce", lambda t, *a, **k: (t, t.numel()))
    T.all_gather_tensor = wrap(T.all_gather_tensor, "all_gather", full_out)
    T.reduce_scatter_tensor = wrap(T.reduce_scatter_tensor, "reduce_scatter", full_in)
    for name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, wrap(getattr(dist, name), "all_gather", full_out))
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, wrap(getattr(dist, name), "reduce_scatter", full_in))


def labelled(function, label, recorder):
    """`function` (a region mapping or the overlapped column linear) marking its forward and backward
    collectives with `label`."""
    import torch

    class Labelled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            recorder.label = label
            try:
                return function.forward(ctx, *args)
            finally:
                recorder.label = None

        @staticmethod
        def backward(ctx, *grads):
            recorder.label = label
            try:
                return function.backward(ctx, *grads)
            finally:
                recorder.label = None

    Labelled.__name__ = function.__name__
    return Labelled


def label_model(model, recorder):
    """Tag each tp mapping of the model (and each overlapped column layer) with where it sits: layers, embedding
    or head; and the loss."""
    from plait.parallel.column_overlap import OverlappedColumn
    from plait.parallel.tensor import MappedColumn, RegionMap

    def tag(holder, attr, label):
        current = getattr(holder, attr, None)
        if isinstance(current, RegionMap):
            setattr(holder, attr, RegionMap(labelled(current.function, label, recorder), current.group))

    for name, module in model.named_modules():
        label = "layers" if name.startswith("layers.") else "embedding" if name == "embed" else "head"
        for attr in ("output_map", "tied_input"):
            tag(module, attr, label)
        run = getattr(module, "run", None)
        if isinstance(run, MappedColumn):
            tag(run, "input_map", label)
        elif isinstance(run, OverlappedColumn):
            run.function = labelled(run.function, label, recorder)
    loss = model.loss

    def labelled_loss(*args, **kwargs):
        recorder.label = "loss"
        try:
            return loss(*args, **kwargs)
        finally:
            recorder.label = None

    model.loss = labelled_loss


# analytic --------------------------------------------------------------------------------
def analytic_bytes(tp, layers, micro, b, s, h, sp, regather=False, tied=False, element_size=4):
    """Per rank and step, by row: the scheme's ring-algorithm volume (fp32 activations); `regather`: SP with
    tp_overlap, each column-parallel layer's input all-gathered again in backward (half an all-reduce)."""
    all_reduce = lambda n: 2 * (tp - 1) / tp * n * element_size
    regathers = (2 * layers, 0 if tied else 1) if regather else (0, 0)  # (in the layers, in the head)
    return {
        "layers": micro * (layers * 4 + regathers[0] / 2) * all_reduce(b * s * h),
        "embedding": micro * all_reduce(b * s * h),  # forward all-reduce (SP: reduce-scatter fwd + all-gather bwd)
        # backward all-reduce (SP: all-gather fwd + reduce-scatter bwd)
        "head": micro * (1 + regathers[1] / 2) * all_reduce(b * s * h),
        "loss": micro * 3 * all_reduce(b * s),  # max, target logit, sum of exp
        "norm grads (SP)": all_reduce((2 * layers + 1) * h) if sp else 0.0,
        "grad norm": all_reduce(1),  # one scalar over the model-parallel group
        "other": 0.0,
    }


# one rank --------------------------------------------------------------------------------
def rank_main(rank, world, args, store):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    recorder = Recorder()
    install_counters(recorder)
    trainers = {}
    for sp, overlap in CONTENDERS:
        overrides = [f"model={args.model}", f"parallel.tp={world}", f"parallel.sequence_parallel={str(sp).lower()}",
                     f"parallel.tp_overlap={str(overlap).lower()}",
                     f"parallel.microbatches={args.microbatches}", f"train.seq_len={args.seq_len}",
                     f"train.batch_size={args.batch_size}", "train.progress=false", "train.peak_flops=1e10",
                     f"train.run_dir={args.run_dir}/sp{int(sp)}-overlap{int(overlap)}", "train.eval_every=0",
                     "train.steps=1000"]
        if args.cache_dir:
            overrides.append(f"data.cache_dir={args.cache_dir}")
        trainer = Trainer(load_config(overrides + args.override), env=ProcessEnv(rank, 0, world, "torchrun"))
        label_model(trainer.model, recorder)
        trainers[sp, overlap] = trainer
    counted, times = {}, defaultdict(list)
    for round_index in range(args.rounds):
        for contender, trainer in trainers.items():  # contenders in turn, so load swings hit all alike
            recorder.counting, recorder.calls = round_index == args.rounds - 1, []
            dist.barrier()
            start = time.perf_counter()
            trainer.step()
            times[contender].append(time.perf_counter() - start)
            if recorder.counting:
                counted[contender] = [(label, kind, size, sent) for label, kind, size, sent, _ in recorder.calls]
    cfg = trainers[CONTENDERS[0]].cfg
    shape = dict(layers=cfg.model.n_layers, micro=cfg.parallel.microbatches, tied=bool(cfg.model.tie_embeddings),
                 b=cfg.train.batch_size // cfg.parallel.microbatches, s=cfg.train.seq_len, h=cfg.model.dim)
    for trainer in trainers.values():
        trainer.close()
    dist.destroy_process_group()
    return {"counted": counted, "times": dict(times), "shape": shape}


def _worker(rank, world, args, store, queue):
    try:
        queue.put((rank, rank_main(rank, world, args, store)))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def spawn(world, args):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        args.run_dir = args.run_dir or os.path.join(tmp, "runs")
        processes = [context.Process(target=_worker, args=(r, world, args, os.path.join(tmp, "store"), queue))
                     for r in range(world)]
        for process in processes:
            process.start()
        results = dict(queue.get(timeout=1800) for _ in range(world))
        for process in processes:
            process.join()
    for rank, result in results.items():
        if isinstance(result, str):
            sys.exit(f"rank {rank} failed:\n{result}")
    return [results[r] for r in range(world)]


# report ----------------------------------------------------------------------------------
def build_rows(results, tp):
    rows = []
    shape = results[0]["shape"]
    for sp, overlap in CONTENDERS:
        expected = analytic_bytes(tp, sp=sp, regather=sp and overlap, **shape)
        for rank, result in enumerate(results):
            sent, counts, kinds = defaultdict(float), defaultdict(int), defaultdict(set)
            for label, kind, size, nbytes in result["counted"][sp, overlap]:
                sent[label] += nbytes
                counts[label] += 1
                kinds[label].add(kind)
            for label in ROW_ORDER:
                if not sent[label] and not expected[label]:
                    continue
                analytic = expected[label]
                rows.append({"sequence_parallel": sp, "tp_overlap": overlap, "rank": rank, "part": label,
                             "measured_bytes": sent[label], "analytic_bytes": analytic,
                             "ratio": sent[label] / analytic if analytic else float("inf"),
                             "collectives": counts[label], "kinds": sorted(kinds[label])})
            times = result["times"][sp, overlap]
            rows.append({"sequence_parallel": sp, "tp_overlap": overlap, "rank": rank, "part": "step time (s)",
                         "median": statistics.median(times), "min": min(times), "max": max(times)})
    return rows


def print_table(rows):
    print(f"{'SP':>3} {'ovl':>3} {'rank':>4} {'part':<16} {'measured B':>12} {'analytic B':>12} {'ratio':>7}  "
          f"collectives")
    for row in rows:
        head = f"{int(row['sequence_parallel']):>3} {int(row['tp_overlap']):>3} {row['rank']:>4} {row['part']:<16}"
        if "ratio" in row:
            print(f"{head} {row['measured_bytes']:>12.0f} {row['analytic_bytes']:>12.0f} {row['ratio']:>7.4f}  "
                  f"{row['collectives']} {','.join(row['kinds'])}")
        else:
            print(f"{head} median {row['median']:.3f} (min {row['min']:.3f}, max {row['max']:.3f})")


def summarize(rows):
    summary = {}
    for sp, overlap in CONTENDERS:
        mine = [r for r in rows if (r["sequence_parallel"], r["tp_overlap"]) == (sp, overlap) and "ratio" in r]
        tag = ("sp" if sp else "no_sp") + ("_overlap" if overlap else "")
        summary[f"layers_ratio_{tag}"] = max(r["ratio"] for r in mine if r["part"] == "layers")
        summary[f"total_ratio_{tag}"] = max(
            sum(r["measured_bytes"] for r in mine if r["rank"] == k) / sum(r["analytic_bytes"] for r in mine if r["rank"] == k)
            for k in {r["rank"] for r in mine})
        summary[f"bytes_per_step_{tag}"] = sum(r["measured_bytes"] for r in mine if r["rank"] == 0)
        times = [r for r in rows if (r["sequence_parallel"], r["tp_overlap"]) == (sp, overlap)
                 and r["part"] == "step time (s)" and r["rank"] == 0]
        summary[f"step_time_median_s_{tag}"] = times[0]["median"]
    for sp in ("no_sp", "sp"):
        summary[f"step_time_ratio_overlap_{sp}"] = (summary[f"step_time_median_s_{sp}_overlap"]
                                                    / summary[f"step_time_median_s_{sp}"])
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("override", nargs="*", help="more config overrides, e.g. model.n_layers=2")
    args = parser.parse_args(argv)
    results = spawn(args.tp, args)
    rows = build_rows(results, args.tp)
    print_table(rows)
    summary = summarize(rows)
    print(json.dumps(summary, indent=2))
    if args.out:
        report = {"benchmark": "tp_comm", "device": f"cpu, gloo, {args.tp} ranks (shared, noisy)",
                  "config": {k: v for k, v in vars(args).items() if k not in ("out", "run_dir")},
                  "rows": rows, "summary": summary}
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as handle:
            json.dump(report, handle, indent=2)
        os.replace(tmp, args.out)
    return summary


if __name__ == "__main__":
    main()
