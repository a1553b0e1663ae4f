"""One checkpoint saved by --dp data-parallel ranks: plait's shared writers against one writer per position and
against torch.distributed.checkpoint (DCP), at ZeRO 0 and ZeRO 3, in the same run.

At --dp gloo ranks (default 4), a Trainer (`model.dim` x `model.n_layers`, AdamW state after one step) saves
synchronously (`checkpoint.async_save=false`, so the save's whole cost is on the clock), round by round:
  - plait: each whole tensor and its optimizer state is written by one dp rank, balanced by bytes
    (`plait.train.checkpoint.writers`), each rank into its own pair of files;
  - plait-1-writer: the same format with every tensor given to dp rank 0 (what plait did before: rank 0
    writes the whole position, and under ZeRO every rank gathers everything);
  - DCP: `torch.distributed.checkpoint.save` of the model's and the optimizer's state (zero=0: torch's
    `get_state_dict`, each replicated tensor written once; zero=3: the FSDP2 parameters and their optimizer
    rows as DTensors, each rank writing its rows; zero=1 has no DCP form of plait's flat ZeRO-1 pieces: not run).
Reported: the save's wall time (from a barrier to the last rank done, median over rounds), the most bytes
one rank wrote, the most bytes one rank held for the save (plait: its snapshot share, gathered
whole under ZeRO; DCP writes from the live tensors and rows: 0), and how far one rank's resident memory
rose above its level before the save at its peak (with --memory, in a run of its own: `rss.py`; the share plus
whatever a gather held on the way).

    python benchmarks/checkpoint_dp.py --out checkpoint_dp.json [--dp 4 --dim 512 --layers 8 --zero 0 1 3] [--memory]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import spawn_world  # noqa: E402
from report import write_json  # noqa: E402
from rss import fix_mmap_threshold, peak_above, start_peak  # noqa: E402

CONTENDERS = ("plait", "plait-1-writer", "DCP")


def contenders(zero: int):
    return [name for name in CONTENDERS if not (name == "DCP" and zero == 1)]


def _trainer(rank, world, zero, args, root: Path):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    cfg = load_config([f"model.dim={args.dim}", f"model.n_layers={args.layers}", "model.n_heads=8",
                       f"model.vocab_size={args.vocab}", "train.seq_len=32", f"train.batch_size={world}",
                       f"parallel.zero={zero}", "train.progress=false", "train.eval_every=0",
                       "checkpoint.save_final=false", "checkpoint.async_save=false", "train.peak_flops=1e10",
                       f"train.run_dir={root / f'run-zero{zero}'}"])
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
    trainer.step()  # the AdamW state exists from here on
    return trainer


def _dcp_state(trainer) -> dict:
    """What DCP saves: the model's and optimizer's state dicts (zero=3: DTensor rows of both)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    if not trainer.fsdp:
        model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
        return {"model": model_state, "optim": optim_state}
    sharded = trainer.optimizer  # plait's ShardOptimizer: the inner optimizer's state is keyed by local rows
    optim_state = {}
    for name, param in sharded.params.items():
        for key, rows in sharded.optimizer.state.get(sharded.views[name], {}).items():
            if torch.is_tensor(rows) and rows.shape == sharded.views[name].shape:
                optim_state[f"{name}/{key}"] = DTensor.from_local(rows, param.device_mesh, param.placements,
                                                                  shape=param.shape, stride=param.stride())
    return {"model": trainer.model.state_dict(), "optim": optim_state}


@contextmanager
def writers_of(name):
    """plait-1-writer: every tensor to dp rank 0 (the format's writer split replaced for the block)."""
    from plait.train import checkpoint

    shared = checkpoint.writers
    if name == "plait-1-writer":
        checkpoint.writers = lambda specs, tp, parts: {param: 0 for param in specs}
    try:
        yield
    finally:
        checkpoint.writers = shared


def _save_once(name, trainer, target: Path) -> None:
    """Save the trainer's state with contender `name` under `target`."""
    import torch.distributed.checkpoint as dcp

    from plait.train.checkpointer import Checkpointer

    if name == "DCP":
        dcp.save(_dcp_state(trainer), checkpoint_id=str(target))
        return
    with writers_of(name):
        trainer.checkpointer = Checkpointer(target, trainer.grid, trainer.device, asynchronous=False)
        trainer.save_checkpoint()


def _held(name, trainer) -> int:
    """Bytes this rank holds for a save: plait's snapshot share; DCP writes from the live tensors (0)."""
    from plait.train.checkpointer import state_bytes

    if name == "DCP":
        return 0
    with writers_of(name):
        return state_bytes(trainer.state().share(trainer.grid))


def _written_by_rank(name, target: Path, rank: int, grid) -> int:
    """Bytes of the tensor files rank `rank` wrote."""
    if name == "DCP":
        return sum(path.stat().st_size for path in target.glob(f"__{rank}_*.distcp"))
    step = next(target.glob("step-*"))
    part = f"-part{grid.grad_rank:03d}" if grid.grad_size > 1 else ""
    mine = [p for p in step.glob("*.safetensors") if p.name.endswith(f"{part}.safetensors")]
    return sum(path.stat().st_size for path in mine) if part or rank == 0 else 0


def _rounds(rank, world, args, base):
    """{(zero, contender): [(seconds, bytes written, bytes held, peak MB above the start) per round]} on this
    rank."""
    import torch.distributed as dist

    results = {}
    for zero in args.zero:
        trainer = _trainer(rank, world, zero, args, base)
        for round_index in range(args.rounds):
            for name in contenders(zero):
                target = base / f"zero{zero}-{name}-{round_index}"
                dist.barrier()
                resident = start_peak() if args.memory else None
                start = time.perf_counter()
                _save_once(name, trainer, target)
                peak = peak_above(resident) if args.memory else None
                dist.barrier()
                seconds = time.perf_counter() - start
                held = _held(name, trainer)
                written = _written_by_rank(name, target, rank, trainer.grid)
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(target, ignore_errors=True)
                results.setdefault((zero, name), []).append((seconds, written, held, peak))
        trainer.close()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each rank's peak resident memory during a save (rss.py: pins glibc's mmap "
                             "threshold, so every big buffer is mapped fresh and saves slow down; take the times "
                             "from a run without it)")
    parser.add_argument("--out", default="checkpoint_dp.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.memory:
        fix_mmap_threshold()
    base = Path(tempfile.mkdtemp(prefix="plait-ckpt-dp-", dir=args.dir))
    try:
        per_rank = spawn_world(args.dp, _rounds, args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    for zero in args.zero:
        for name in contenders(zero):
            rounds = [per_rank[rank][(zero, name)] for rank in range(args.dp)]
            seconds = statistics.median(max(rank_rounds[i][0] for rank_rounds in rounds) for i in range(args.rounds))
            rows.append({"zero": zero, "contender": name, "save_s": seconds,
                         "max_rank_written_bytes": max(r[-1][1] for r in rounds),
                         "total_written_bytes": sum(r[-1][1] for r in rounds),
                         "max_rank_held_bytes": max(r[-1][2] for r in rounds),
                         "max_rank_peak_mb": max(entry[3] for r in rounds for entry in r) if args.memory else None})
    by = {(row["zero"], row["contender"]): row for row in rows}
    for row in rows:
        ours = by[(row["zero"], "plait")]
        row["plait_time_ratio"] = ours["save_s"] / row["save_s"]
        row["plait_max_written_ratio"] = ours["max_rank_written_bytes"] / max(1, row["max_rank_written_bytes"])
    print(f"dp={args.dp} (gloo), dim {args.dim}, {args.layers} layers, vocab {args.vocab}, AdamW; "
          f"synchronous saves, median of {args.rounds}")
    print(f"{'zero':>4} {'contender':<15} {'save s':>7} {'MB max/rank':>11} {'MB total':>9} {'MB held/rank':>12} "
          f"{'peak MB/rank':>12} {'plait time x':>12} {'plait max/rank x':>16}")
    for row in rows:
        print(f"{row['zero']:>4} {row['contender']:<15} {row['save_s']:>7.2f} {row['max_rank_written_bytes'] / 1e6:>11.1f} "
              f"{row['total_written_bytes'] / 1e6:>9.1f} {row['max_rank_held_bytes'] / 1e6:>12.1f} "
              f"{row['max_rank_peak_mb'] or float('nan'):>12.1f} {row['plait_time_ratio']:>12.3f} "
              f"{row['plait_max_written_ratio']:>16.3f}")
    print("peak MB/rank (--memory): how far one rank's resident memory rose above its level before the save, at the "
          "peak; times of a --memory run are slowed by it")
    write_json(args.out, {"benchmark": "checkpoint_dp", "device": "cpu (gloo)", "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
