"""Zero-bubble under ZeRO-3: plait's ZB-V against torch.distributed.pipelining's ScheduleZBVZeroBubble, both over
FSDP2 (`fully_shard` per block and per chunk), on the same chunks and batches.

pp=2 x dp=2 gloo ranks (spawned here, no ports); each rank holds two chunks in a V. Contenders, each in a world of
its own processes (so each process's peak resident memory is that contender's):
  - plait-zero0: plait's runtime, whole weights, grads and state (bucketed all-reduce): the unsharded baseline;
  - plait-zero2, plait-zero3: plait's runtime over ShardedGrads; each W's weight grads are reduce-scattered right
    after it (`after_weights`); zero=2 gathers the weights once a step, zero=3 before each forward and each I;
  - torch's stages (ScheduleZBVZeroBubble) over the same chunks under FSDP2. torch defers every reduce-scatter to
    the step's end (no gradient sync, no reshard after backward, then `perform_reduce_grad` by hand), so a rank
    holds its stage's grads whole through the step. Two ways of sharding: torch-fsdp-block, fully_shard per
    block and per chunk (torchtitan's; blocks resharded after forward: ZeRO-3), and torch-fsdp-chunk, per chunk
    only with the weights whole from forward to backward (ZeRO-2 in a step). Measured here (torch 2.13, gloo):
    torch-fsdp-block leaves the last stage's blocks without grads every step, and a chunk resharded after forward
    leaves the whole last chunk without (cause not looked into); the "no grad" column counts them.
Each takes AdamW (torch's, foreach) over its parameters. Reported: median step time (forward, backward, optimizer),
peak resident memory above the process's memory before the model was built (max over ranks, with --memory), and the
first and last steps' losses (the same weights and batches: equal losses say the contenders do the same work).

    python benchmarks/zero_bubble_fsdp.py --out zero_bubble_fsdp.json             # step times
    python benchmarks/zero_bubble_fsdp.py --memory --out zero_bubble_fsdp-mem.json  # peak memory (slower steps)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import spawn_world  # noqa: E402
from report import write_json  # noqa: E402
from rss import fix_mmap_threshold, peak_above, start_peak  # noqa: E402

PP, DP = 2, 2
CONTENDERS = ("plait-zero0", "plait-zero2", "plait-zero3", "torch-fsdp-block", "torch-fsdp-chunk")


def _chunks(args, grid):
    from plait.train.build import build_chunks
    from plait.train.config import ModelConfig

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, vocab_size=args.vocab, max_seq_len=args.seq)
    return build_chunks(cfg, grid, vpp=2, seed=0, placement="v")


def _without_grad(chunks) -> int:
    """How many of this rank's parameters the step left without a grad (0 when the backward reached them all)."""
    return sum(p.grad is None for chunk in chunks for p in chunk.parameters())


def _loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


class Plait:
    def __init__(self, zero, args, grid):
        from plait.parallel.config import ParallelConfig
        from plait.parallel.data_parallel import DataParallelGrads
        from plait.parallel.fsdp import ShardedGrads
        from plait.parallel.pipeline.runtime import PipelineRuntime

        self.chunks = _chunks(args, grid)
        if zero >= 2:
            self.grads = ShardedGrads(self.chunks, grid, zero)
        else:
            self.grads = DataParallelGrads(self.chunks, grid, ParallelConfig(bucket_mb=args.bucket_mb))
        params = [p for chunk in self.chunks for p in chunk.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        self.runtime = PipelineRuntime(self.chunks, grid, schedule="zbv", vpp=2, microbatches=args.microbatches,
                                       hidden_shape=(args.micro_batch, args.seq, args.dim))

    def step(self, batch):
        loss = self.runtime.run(batch[:, :, :-1], batch[:, :, 1:], _loss, before_last_backward=self.grads.start_overlap,
                                after_weights=self.grads.after_weights)
        self.grads.finish()  # the averaged grads are in each parameter's .grad (zero=3: its rows)
        self.missing = _without_grad(self.chunks)
        self.optimizer.step()
        self.grads.zero_grad()
        return float(loss)


class Torch:
    def __init__(self, args, grid, per_block: bool):
        from torch.distributed import pipelining
        from torch.distributed.fsdp import fully_shard

        from plait.parallel.pipeline.schedule import local_stages

        self.chunks = _chunks(args, grid)
        mesh = grid.mesh["dp"]
        for chunk in self.chunks:
            if per_block:
                for block in chunk.layers.values():
                    fully_shard(block, mesh=mesh)
            fully_shard(chunk, mesh=mesh, reshard_after_forward=False)
        stages = [pipelining.PipelineStage(chunk, stage, PP * 2, torch.device("cpu"), group=grid.pp_group)
                  for stage, chunk in zip(local_stages(grid.pp_rank, PP, 2, "v"), self.chunks)]
        self.schedule = pipelining.ScheduleZBVZeroBubble(stages, args.microbatches, loss_fn=_loss)
        self.optimizer = torch.optim.AdamW([p for chunk in self.chunks for p in chunk.parameters()], lr=1e-4,
                                           foreach=True)
        self.grid = grid

    def step(self, batch):
        import torch.distributed as dist

        inputs, targets = batch[:, :, :-1].flatten(0, 1), batch[:, :, 1:].flatten(0, 1)
        losses = []
        if self.grid.pp_rank == 0:  # the V: stage 0 (embedding) and the last stage (loss) are both on pp rank 0
            self.schedule.step(inputs, target=targets, losses=losses, return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)
        self.missing = _without_grad(self.chunks)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        dist.broadcast(loss, src=self.grid.group_ranks["pp"][0], group=self.grid.pp_group)
        return float(loss)


def _steps(rank, world, name, args):
    """(step times, losses, peak MB or None, parameters left without grad) of contender `name` on this rank."""
    import torch.distributed as dist

    from plait.parallel.grid import Grid

    grid = Grid.build(pp=PP, dp=DP)
    before = start_peak() if args.memory else None
    if name.startswith("torch"):
        contender = Torch(args, grid, per_block=name.endswith("block"))
    else:
        contender = Plait(int(name[-1]), args, grid)
    generator = torch.Generator().manual_seed(grid.dp_rank)
    times, losses, missing = [], [], 0
    for round_index in range(args.warmup + args.rounds):
        batch = torch.randint(0, args.vocab, (args.microbatches, args.micro_batch, args.seq + 1), generator=generator)
        dist.barrier()
        start = time.perf_counter()
        losses.append(contender.step(batch))
        dist.barrier()
        missing = max(missing, contender.missing)
        if round_index >= args.warmup:
            times.append(time.perf_counter() - start)
    return times, losses, peak_above(before) if args.memory else None, missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory", action="store_true",
                        help="measure each rank's peak resident memory (rss.py: pins glibc's mmap threshold, which "
                             "slows every contender's steps; take the times from a run without it)")
    parser.add_argument("--out", default="zero_bubble_fsdp.json")
    args = parser.parse_args(argv)

    if args.memory:
        fix_mmap_threshold()  # the workers' peaks follow their live tensors (rss.py)
    rows = {}
    for name in CONTENDERS:
        per_rank = spawn_world(PP * DP, _steps, name, args, timeout=1800)  # a world of its own per contender
        step_s = statistics.median(max(times) for times in zip(*(r[0] for r in per_rank)))
        rows[name] = {"step_s": step_s, "first_loss": per_rank[0][1][0], "last_loss": per_rank[0][1][-1],
                      "peak_mb": max(r[2] for r in per_rank) if args.memory else None,
                      "params_without_grad": sum(r[3] for r in per_rank)}
        print(f"{name}: done", flush=True)
    torch_row = rows["torch-fsdp-chunk"]
    print(f"\nZB-V, pp={PP} x dp={DP} gloo ranks, dim {args.dim} x {args.layers} layers, vocab {args.vocab}, "
          f"{args.microbatches} micro-batches of {args.micro_batch} x {args.seq}")
    print(f"{'contender':<17} {'step s':>7} {'x torch':>7} {'peak MB':>8} {'x torch':>7} {'loss 1':>8} "
          f"{'loss last':>9} {'no grad':>7}")
    for name, row in rows.items():
        peak = (f"{row['peak_mb']:8.1f} {row['peak_mb'] / torch_row['peak_mb']:7.2f}" if args.memory
                else f"{'-':>8} {'-':>7}")
        print(f"{name:<17} {row['step_s']:7.3f} {row['step_s'] / torch_row['step_s']:7.2f} {peak} "
              f"{row['first_loss']:8.4f} {row['last_loss']:9.4f} {row['params_without_grad']:7d}")
    print("x torch: against torch-fsdp-chunk; no grad: parameters (all ranks) a step left without a grad")
    write_json(args.out, {"settings": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
