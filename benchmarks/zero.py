"""ZeRO 0/1/2/3 in plait against torch's FSDP2 (`fully_shard`) on the same model: step time, communication hidden.

At --dp gloo ranks (default 4) the same model and batches run round by round through:
  - plait zero=0 (bucketed all-reduce), zero=1 (reduce-scatter, sharded state, all-gather of weights),
  - plait zero=2 and zero=3 (FSDP2 under plait: weights gathered once a step / per block and micro-batch,
    grads reduce-scattered per block, plait's optimizer stepping the local shards),
  - torch FSDP2 as torchtitan applies it: fully_shard per block and on the root, torch AdamW (foreach)
    over the DTensor parameters.
Hidden share of communication = 1 - exposed / alone, where exposed = step time at dp minus the same
contender's step time in dp one-rank worlds run side by side (the same per-rank work on the same cores,
no peer), and alone = the time the
contender's collectives take by themselves (the same all-gathers, reduce-scatters and all-reduces, one
per block and micro-batch as the contender issues them, timed back to back in the dp world).

    python benchmarks/zero.py --out zero.json
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402

CONTENDERS = ("plait-zero0", "plait-zero1", "plait-zero2", "plait-zero3", "torch-fsdp2")


def _model(args, grid):
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, vocab_size=args.vocab, max_seq_len=512)
    return build_model(cfg, grid, seed=0)


def _plait(zero, args, grid):
    """(model, grads, optimizer) of plait at `zero`, built as the trainer builds them."""
    from plait.optim.builder import make_optimizer
    from plait.optim.config import OptimConfig
    from plait.optim.groups import param_groups
    from plait.parallel.config import ParallelConfig
    from plait.parallel.data_parallel import DataParallelGrads
    from plait.parallel.fsdp import ShardedGrads
    from plait.parallel.shard_optimizer import ShardOptimizer
    from plait.parallel.zero import ZeroOptimizer

    model = _model(args, grid)
    optim_cfg = OptimConfig(impl="foreach")
    make = lambda groups: make_optimizer(groups, optim_cfg)  # noqa: E731
    if zero >= 2:
        grads = ShardedGrads([model], grid, zero)
        return model, grads, ShardOptimizer(grads, make, param_groups(dict(model.named_parameters()), 0.0))
    grads = DataParallelGrads([model], grid, ParallelConfig(bucket_mb=args.bucket_mb), shard=zero == 1)
    groups = param_groups(dict(model.named_parameters()), 0.0)
    optimizer = ZeroOptimizer(grads, grid, make, groups) if zero == 1 else make(groups)
    return model, grads, optimizer


def _plait_step(model, grads, optimizer, batch):
    micro = batch.shape[0]
    for index in range(micro):
        if index == micro - 1:
            grads.start_overlap(0)
        (model.loss(model(batch[index, :, :-1]), batch[index, :, 1:]) / micro).backward()
    grads.finish()
    optimizer.step()
    grads.zero_grad()


def _fsdp2(args, grid):
    from torch.distributed.fsdp import fully_shard

    model = _model(args, grid)
    for block in model.layers.values():
        fully_shard(block, mesh=grid.mesh["dp"])
    fully_shard(model, mesh=grid.mesh["dp"])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)


def _fsdp2_step(model, optimizer, batch):
    micro = batch.shape[0]
    for index in range(micro):
        (model.loss(model(batch[index, :, :-1]), batch[index, :, 1:]) / micro).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _runners(args, grid):
    runners = {}
    for zero in range(4):
        model, grads, optimizer = _plait(zero, args, grid)
        runners[f"plait-zero{zero}"] = lambda b, m=model, g=grads, o=optimizer: _plait_step(m, g, o, b)
    model, optimizer = _fsdp2(args, grid)
    runners["torch-fsdp2"] = lambda b: _fsdp2_step(model, optimizer, b)
    return runners


def _collectives(args, grid, block_numels, total):
    """For each contender, a function issuing its collectives alone (sizes as it sends them)."""
    import torch.distributed as dist

    group, dp, m = grid.dp_group, grid.dp, args.microbatches
    sizes = [-(-n // dp) * dp for n in block_numels]

    def gather_all():
        for n in sizes:
            dist.all_gather_into_tensor(torch.empty(n), torch.empty(n // dp), group=group)

    def scatter_all():
        for n in sizes:
            dist.reduce_scatter_tensor(torch.empty(n // dp), torch.empty(n), group=group)

    bucket = int(args.bucket_mb * 2**20 / 4)
    buckets = [min(bucket, total - start) for start in range(0, total, bucket)]

    def all_reduce():
        for n in buckets:
            dist.all_reduce(torch.empty(n), group=group)

    def zero1():
        for n in buckets:
            n = -(-n // dp) * dp
            dist.reduce_scatter_tensor(torch.empty(n // dp), torch.empty(n), group=group)
            dist.all_gather_into_tensor(torch.empty(n), torch.empty(n // dp), group=group)

    def zero2():
        gather_all()
        for _ in range(m):
            scatter_all()

    def zero3():
        for _ in range(m):
            gather_all()
            gather_all()
            scatter_all()

    return {"plait-zero0": all_reduce, "plait-zero1": zero1, "plait-zero2": zero2, "plait-zero3": zero3,
            "torch-fsdp2": zero3}


def _time_rounds(runners, args, rank, world):
    import torch.distributed as dist

    generator = torch.Generator().manual_seed(rank)
    times = {name: [] for name in runners}
    for round_index in range(args.warmup + args.rounds):
        batch = torch.randint(0, args.vocab, (args.microbatches, args.micro_batch, args.seq + 1), generator=generator)
        for name, run in runners.items():
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            run(batch)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _worker(rank, world, store, args, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    from plait.parallel.grid import Grid

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    grid = Grid.build(tp=1, pp=1)
    runners = _runners(args, grid)
    times = _time_rounds(runners, args, rank, world)
    alone = {}
    if world > 1:
        model = _model(args, Grid.single())
        blocks = [sum(p.numel() for p in block.parameters()) for block in model.layers.values()]
        root = sum(p.numel() for p in model.parameters()) - sum(blocks)
        issue = _collectives(args, grid, blocks + [root], sum(p.numel() for p in model.parameters()))
        alone = {name: [] for name in issue}
        for round_index in range(args.warmup + args.rounds):
            for name, run in issue.items():
                dist.barrier()
                start = time.perf_counter()
                run()
                if round_index >= args.warmup:
                    alone[name].append(time.perf_counter() - start)
    queue.put((rank, times, alone))
    dist.destroy_process_group()


def _spawn(world, args, alone=False):
    """Rank 0's (times, collectives alone) of `world` ranks; `alone`: as many one-rank worlds side by side (the
    same processes on the same cores, each with no peer: the compute the dp world overlaps its messages with)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [context.Process(target=_worker, args=(0, 1, os.path.join(tmp, f"store{r}"), args, queue))
                 if alone else
                 context.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), args, queue))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        results = sorted((queue.get(timeout=3600) for _ in procs), key=lambda r: r[0])
        for proc in procs:
            proc.join()
    return results[0][1], results[0][2]  # rank 0's view


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="zero.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    times, alone = _spawn(args.dp, args)
    solo, _ = _spawn(args.dp, args, alone=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name in CONTENDERS:
        exposed = max(0.0, median[name] - statistics.median(solo[name]))
        comm = statistics.median(alone[name])
        rows.append({"contender": name, "step_s": median[name], "step_min_s": min(times[name]),
                     "step_max_s": max(times[name]), "one_rank_step_s": statistics.median(solo[name]),
                     "comm_alone_s": comm, "exposed_s": exposed, "hidden_share": max(0.0, 1 - exposed / comm),
                     "vs_zero1": median[name] / median["plait-zero1"], "vs_fsdp2": median[name] / median["torch-fsdp2"]})
    print(f"dp={args.dp} (gloo), dim {args.dim}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.microbatches} micro-batches of {args.micro_batch} x {args.seq}")
    print(f"{'contender':<13} {'step ms':>8} {'no-peer ms':>10} {'comm alone':>11} {'exposed':>8} {'hidden':>7} "
          f"{'x zero1':>8} {'x FSDP2':>8}")
    for row in rows:
        print(f"{row['contender']:<13} {1e3 * row['step_s']:>8.1f} {1e3 * row['one_rank_step_s']:>10.1f} "
              f"{1e3 * row['comm_alone_s']:>11.1f} {1e3 * row['exposed_s']:>8.1f} {100 * row['hidden_share']:>6.0f}% "
              f"{row['vs_zero1']:>8.3f} {row['vs_fsdp2']:>8.3f}")
    by_name = {row["contender"]: row for row in rows}
    summary = {"zero3_vs_zero1": by_name["plait-zero3"]["vs_zero1"],
               "zero3_vs_fsdp2": by_name["plait-zero3"]["vs_fsdp2"],
               "goal_zero3_within_1.15x_zero1": by_name["plait-zero3"]["vs_zero1"] <= 1.15,
               "goal_zero3_not_slower_than_fsdp2": by_name["plait-zero3"]["vs_fsdp2"] <= 1.0}
    print(f"zero3 / zero1 = {summary['zero3_vs_zero1']:.3f} (goal <= 1.15); "
          f"zero3 / FSDP2 = {summary['zero3_vs_fsdp2']:.3f} (goal <= 1)")
    write_json(args.out, {"benchmark": "zero", "device": "cpu (gloo)", "args": vars(args), "rows": rows,
                          "summary": summary})


if __name__ == "__main__":
    main()
