"""ZeRO-1's weight all-gathers: waited after the step, or overlapped with the next forward, against torch's
`ZeroRedundancyOptimizer` over DDP (its weights broadcast from each owner after the step).

For each --dp (gloo ranks), the same model and batches run round by round through:
  - plait ZeRO-1, gathers waited: every bucket's all-gather finishes inside the optimizer step,
  - plait ZeRO-1, gathers overlapped (`parallel.overlap_param_gather=true`): they are left in flight and each
    module's forward waits for its own bucket only (Megatron's --overlap-param-gather),
  - torch DDP + ZeroRedundancyOptimizer (AdamW, foreach).
"Waited" is the time a rank spent waiting for gathers (at the step's end, or in the forward's hooks), and
"hidden" = 1 - waited / waited by the contender that waits right after the step.

    python benchmarks/zero1_gather.py --out zero1_gather.json
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_overlap import print_table, spread, workload_args  # noqa: E402
from ranks import spawn_world  # noqa: E402
from report import write_json  # noqa: E402

CONTENDERS = ("plait-waited", "plait-overlapped", "torch-zero-redundancy")


def _model(args, grid):
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, vocab_size=args.vocab, max_seq_len=512)
    return build_model(cfg, grid, seed=0)


class _Waits:
    """Wraps a ChunkGrads' `wait_params` to add up the seconds spent in it."""

    def __init__(self, chunk):
        self.seconds, self.inner = 0.0, chunk.wait_params
        chunk.wait_params = self

    def __call__(self, indices=None):
        start = time.perf_counter()
        self.inner(indices)
        self.seconds += time.perf_counter() - start


def _plait(overlap, args, grid):
    from plait.optim.builder import make_optimizer
    from plait.optim.config import OptimConfig
    from plait.optim.groups import param_groups
    from plait.parallel.config import ParallelConfig
    from plait.parallel.data_parallel import DataParallelGrads
    from plait.parallel.zero import ZeroOptimizer

    model = _model(args, grid)
    grads = DataParallelGrads([model], grid, ParallelConfig(bucket_mb=args.bucket_mb), shard=True)
    optimizer = ZeroOptimizer(grads, grid, lambda groups: make_optimizer(groups, OptimConfig(impl="foreach")),
                              param_groups(dict(model.named_parameters()), 0.1))
    waits = _Waits(grads.chunks[0])
    if overlap:
        optimizer.overlap_gathers_with_forward()

    def step(batch):
        micro = batch.shape[0]
        for index in range(micro):
            if index == micro - 1:
                grads.start_overlap()
            (model.loss(model(batch[index, :, :-1]), batch[index, :, 1:]) / micro).backward()
        grads.finish()
        optimizer.step()
        grads.zero_grad()
    return step, waits


def _torch(args, grid):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _model(args, grid)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=3e-3,
                                        weight_decay=0.1, foreach=True)

    def step(batch):
        micro = batch.shape[0]
        for index in range(micro):
            context = ddp.no_sync() if index < micro - 1 else torch.enable_grad()
            with context:
                (model.loss(ddp(batch[index, :, :-1]), batch[index, :, 1:]) / micro).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, None


def _worker(rank, world, args):
    import torch.distributed as dist

    from plait.parallel.grid import Grid

    grid = Grid.build(tp=1, pp=1)
    runners = {"plait-waited": _plait(False, args, grid), "plait-overlapped": _plait(True, args, grid),
               "torch-zero-redundancy": _torch(args, Grid.single())}
    generator = torch.Generator().manual_seed(rank)
    times = {name: [] for name in CONTENDERS}
    waited = {name: [] for name in CONTENDERS}
    for round_index in range(args.warmup + args.rounds):
        batch = torch.randint(0, args.vocab, (args.microbatches, args.micro_batch, args.seq + 1), generator=generator)
        for name in CONTENDERS:
            step, waits = runners[name]
            dist.barrier()
            before = waits.seconds if waits else 0.0
            start = time.perf_counter()
            step(batch)
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed)
                if waits:
                    waited[name].append(waits.seconds - before)
    for step, waits in runners.values():
        if waits:
            waits.inner()  # nothing left in flight at the end
    return times, waited


def run(dp, args):
    times, waited = spawn_world(dp, _worker, args)[0]  # rank 0's view
    peer = statistics.median(times["torch-zero-redundancy"])
    base = statistics.median(waited["plait-waited"])
    rows = []
    for name in CONTENDERS:
        row = {"dp": dp, "contender": name, "step_s": spread(times[name]),
               "vs_torch": statistics.median(times[name]) / peer}
        if waited[name]:
            row["waited_s"] = spread(waited[name])
            row["hidden_fraction"] = max(0.0, 1.0 - statistics.median(waited[name]) / base)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(parser, "zero1_gather.json")
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = [row for dp in args.dp for row in run(dp, args)]
    print_table(rows, "vs_torch", "x torch", "waited_s", "waited ms")
    write_json(args.out, {"benchmark": "zero1_gather", "device": "cpu (gloo)", "rows": rows,
                          "summary": {f"dp{r['dp']}_{r['contender']}_vs_torch": r["vs_torch"] for r in rows}})


if __name__ == "__main__":
    main()
