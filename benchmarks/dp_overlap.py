"""How much gradient reduction plait hides behind backward, and its step time against torch DDP.

For dp in (2, 4) gloo ranks, the same tiny model and batches run round by round through:
  - plait, bucketed (buckets of --bucket-mb, reduction overlapped with backward),
  - plait, one bucket (no bucketing: the reduction starts when backward ends),
  - plait, no overlap (every bucket reduced after backward: the reference for exposed time),
  - torch.nn.parallel.DistributedDataParallel (its own 25 MB buckets, no_sync on early micro-batches).
Hidden fraction = 1 - exposed / exposed_without_overlap, where exposed is the wall time from
the end of backward until the reduction finished (timestamps from plait's reducer).

    python benchmarks/dp_overlap.py --out dp_overlap.json
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

CONTENDERS = ("plait-bucketed", "plait-one-bucket", "plait-no-overlap", "torch-ddp")


def _model(dim, layers, grid):
    from plait.train.config import ModelConfig
    from plait.train.build import build_model

    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=8, vocab_size=256, max_seq_len=512)
    return build_model(cfg, grid, seed=0)


def _plait_step(model, grads, optimizer, batch):
    micro = batch.shape[0]
    for index in range(micro):
        if index == micro - 1:
            grads.start_overlap()
        (model.loss(model(batch[index, :, :-1]), batch[index, :, 1:]) / micro).backward()
    grads.finish()
    optimizer.step()
    grads.zero_grad()
    times = grads.chunks[0].times
    return times.finished - times.backward_end


def _ddp_step(ddp, optimizer, batch):
    micro = batch.shape[0]
    for index in range(micro):
        context = ddp.no_sync() if index < micro - 1 else torch.enable_grad()
        with context:
            (ddp.module.loss(ddp(batch[index, :, :-1]), batch[index, :, 1:]) / micro).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _worker(rank, world, store, args, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    from plait.parallel.config import ParallelConfig
    from plait.parallel.data_parallel import DataParallelGrads
    from plait.parallel.grid import Grid

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    grid = Grid.build(tp=1, pp=1)
    runners = {}
    for name, (bucket_mb, overlap) in {"plait-bucketed": (args.bucket_mb, True),
                                       "plait-one-bucket": (0.0, True),
                                       "plait-no-overlap": (args.bucket_mb, False)}.items():
        model = _model(args.dim, args.layers, grid)
        grads = DataParallelGrads([model], grid, ParallelConfig(bucket_mb=bucket_mb, overlap_grad_reduce=overlap))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        runners[name] = (lambda b, m=model, g=grads, o=optimizer: _plait_step(m, g, o, b))
    ddp_model = _model(args.dim, args.layers, Grid.single())
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_model)
    ddp_optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=1e-4, foreach=True)
    runners["torch-ddp"] = lambda b: _ddp_step(ddp, ddp_optimizer, b)
    generator = torch.Generator().manual_seed(rank)
    times = {name: [] for name in CONTENDERS}
    exposed = {name: [] for name in CONTENDERS if name.startswith("plait")}
    for round_index in range(args.warmup + args.rounds):
        batch = torch.randint(0, 256, (args.microbatches, args.micro_batch, args.seq + 1), generator=generator)
        for name in CONTENDERS:
            dist.barrier()
            start = time.perf_counter()
            result = runners[name](batch)
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed)
                if name in exposed:
                    exposed[name].append(result)
    queue.put((rank, times, exposed))
    dist.destroy_process_group()


def spread(values):
    """Median, min and max of a contender's per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def print_table(rows, ratio_key, ratio_label, cost_key, cost_label):
    """One line per (dp, contender): median step ms (min-max), the ratio to the peer, the cost and its hidden share."""
    print(f"{'dp':>3} {'contender':<22} {'step ms (min-max)':>20} {ratio_label:>8} {cost_label:>11} {'hidden':>7}")
    for row in rows:
        step = row["step_s"]
        cost = f"{1e3 * row[cost_key]['median']:.1f}" if cost_key in row else "-"
        hidden = f"{100 * row['hidden_fraction']:.0f}%" if "hidden_fraction" in row else "-"
        print(f"{row['dp']:>3} {row['contender']:<22} {1e3 * step['median']:>8.1f} ({1e3 * step['min']:.0f}-"
              f"{1e3 * step['max']:.0f}) {row[ratio_key]:>8.3f} {cost:>11} {hidden:>7}")


def workload_args(parser, out):
    """The data-parallel benchmarks' shared settings: dp sizes, the model and batch, buckets, rounds, --out."""
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=out)


def run(dp, args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [context.Process(target=_worker, args=(r, dp, os.path.join(tmp, "store"), args, queue))
                 for r in range(dp)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
    _, times, exposed = sorted(results, key=lambda r: r[0])[0]  # rank 0's view
    rows = []
    no_overlap = statistics.median(exposed["plait-no-overlap"])
    ddp = statistics.median(times["torch-ddp"])
    for name in CONTENDERS:
        row = {"dp": dp, "contender": name, "step_s": spread(times[name]),
               "vs_ddp": statistics.median(times[name]) / ddp}
        if name in exposed:
            row["exposed_s"] = spread(exposed[name])
            row["hidden_fraction"] = max(0.0, 1.0 - statistics.median(exposed[name]) / no_overlap)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(parser, "dp_overlap.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = [row for dp in args.dp for row in run(dp, args)]
    print_table(rows, "vs_ddp", "x DDP", "exposed_s", "exposed ms")
    summary = {}
    for row in rows:
        key = f"dp{row['dp']}_{row['contender']}"
        summary[f"{key}_vs_ddp"] = row["vs_ddp"]
        if "hidden_fraction" in row:
            summary[f"{key}_hidden_fraction"] = row["hidden_fraction"]
    with open(args.out, "w") as handle:
        json.dump({"benchmark": "dp_overlap", "device": "cpu (gloo)", "rows": rows, "summary": summary}, handle,
                  indent=2)


if __name__ == "__main__":
    main()
