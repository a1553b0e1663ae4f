"""Checkpoint save and load throughput, and how long a save stops training: plait against torch.save
and torch.distributed.checkpoint (DCP), on the same model and AdamW state, in the same run.

Two parts. `--part stall` (the default first): a training run of a model of `--stall-dim`
x `--stall-layers` (about 170M parameters by default, with AdamW state after one step,
2 GB of checkpoint) on 1 torch thread, saved while it trains, round by round:
  - plait sync: `checkpoint.async_save=false` (snapshot into the file buffers, O_DIRECT write,
    fsync, rename, in the training thread);
  - plait async: the default (the snapshot on the writer thread while the next forward and
    backward run; `before_update` waits only if it is not done by the optimizer step);
  - DCP async_save (its staging copy, then a writer thread), the peer;
and reports the time `step()` is blocked by the save (the save call plus any wait before the
next optimizer update), the write's own time and bandwidth against the disk's (a plain
O_DIRECT write of the same bytes, measured in the same run), and how much slower the steps
run while a background write is going.
`--part throughput`: the older save/load rates:

One process (tp=1), a LLaMA-shaped model with AdamW state after one step (params + 2
moments, fp32). Each round saves and then loads once with every contender, in turn:
  - plait: safetensors + index, CRC-32C of every file on save and checked on load, fsync
    and rename (what `train.resume` does),
  - plait-nohash: the same files read back without the CRC-32C check (the cost of checking),
  - torch.save / torch.load (pickle, weights_only load), no fsync,
  - torch.distributed.checkpoint (dcp.save / dcp.load, no process group), no fsync.
GB/s = checkpoint bytes on disk / wall time; medians over rounds, with min and max. Reads
come from the page cache for everyone (the files were just written), so this compares
the software paths, not the disk.

    python benchmarks/checkpoint.py --out checkpoint.json [--dim 256 --layers 4 --rounds 5]
    python benchmarks/checkpoint.py --part stall --out checkpoint_stall.json [--device cuda --stall-preset 1b]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

CONTENDERS = ("plait", "plait-nohash", "torch.save", "torch.dcp")


def build_state(dim, layers):
    from plait.train.config import ModelConfig
    from plait.train.build import build_model

    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=8, vocab_size=32000, max_seq_len=512)
    model = build_model(cfg, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(0, 32000, (1, 16))
    model.loss(model(ids), ids).backward()
    optimizer.step()
    return cfg, model, optimizer


def dir_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class Plait:
    def __init__(self, cfg, model, optimizer, verify=True):
        from plait.optim.state import named_state
        from plait.parallel.grid import Grid
        from plait.parallel.plans import param_specs
        from plait.train.checkpoint import SaveRequest, layout_meta, model_meta

        self.grid, self.model, self.optimizer, self.verify = Grid.single(), model, optimizer, verify
        self.named = dict(model.named_parameters())
        self.specs = param_specs(model)
        self.request = lambda: SaveRequest(1, self.named, self.specs, named_state(optimizer, self.named),
                                           {"step": 1}, {**layout_meta(self.grid), **model_meta(cfg)})

    def save(self, root):
        from plait.train.checkpoint import save

        return save(root, self.grid, self.request())

    def load(self, root):
        from plait.optim.state import load_named_state
        from plait.train.reshard import ShardReader, load_optim_state, load_params

        reader = ShardReader(root)
        if not self.verify:
            reader.index = {**reader.index, "files": {}}  # no records: sizes and hashes are not checked
        load_params(reader, self.named, self.specs, self.grid)
        load_named_state(self.optimizer, self.named, load_optim_state(reader, self.named, self.specs, self.grid))


class TorchSave:
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def save(self, root):
        Path(root).mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}, Path(root) / "ckpt.pt")

    def load(self, root):
        state = torch.load(Path(root) / "ckpt.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])


class TorchDCP:
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, root):
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(root))

    def load(self, root):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(root))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# the stall: how long a save stops training ---------------------------------------------------------
def stall_trainer(args, root: Path):
    """A Trainer over the stdlib corpus with a model of about 170M parameters (or the 1B preset)."""
    from plait.train.config import load_config
    from plait.train.trainer import Trainer

    shape = (["model=1b", "train.seq_len=2048", "train.batch_size=8", "train.precision=bf16"]
             if args.stall_preset == "1b" else
             [f"model.dim={args.stall_dim}", f"model.n_layers={args.stall_layers}", "model.n_heads=16",
              "model.vocab_size=32000", "train.seq_len=32", "train.batch_size=1"])
    cfg = load_config([*shape, "train.steps=100000", "train.eval_every=0", "train.log_every=1000",
                       "train.progress=false", f"train.device={args.device}", f"train.run_dir={root / 'run'}",
                       "checkpoint.save_final=false", "train.compile=false", "optim.warmup_steps=1"])
    return Trainer(cfg)


class DCPAsync:
    """torch.distributed.checkpoint.async_save of the model and optimizer state (its staging, then a thread)."""

    def __init__(self, trainer, root: Path):
        self.trainer, self.root, self.future, self.count = trainer, root, None, 0
        self.stall_s, self.last_write = 0.0, {}

    def save(self, state):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.trainer.model, self.trainer.optimizer)
        self.count += 1
        self.started = time.perf_counter()
        self.future = dcp.async_save({"model": model_state, "optim": optim_state},
                                     checkpoint_id=str(self.root / f"step-{self.count}"))
        return self.root

    def before_update(self):
        pass

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> float:
        if self.future is not None:
            self.future.result()
            self.last_write = {"seconds": time.perf_counter() - self.started,
                               "bytes": dir_bytes(self.root / f"step-{self.count}")}
            self.future = None
        return 0.0

    def close(self):
        self.wait()


def checkpointer(trainer, root: Path, asynchronous: bool):
    from plait.train.checkpointer import Checkpointer

    made = Checkpointer(root, trainer.grid, trainer.device, keep=1, asynchronous=asynchronous)
    made.done = lambda: made.pending is None or made.pending.done()
    return made


def measure_stall(trainer, saver, rounds: int, base_steps: int = 3) -> dict:
    """Per round: steps without a save (the base step time), a save, then steps until its write is done."""
    blocked, writes, during, base = [], [], [], []
    trainer.checkpointer = saver  # the trainer's step calls its before_update
    if hasattr(saver, "prepare"):  # as Trainer.fit does after its first step
        saver.prepare(trainer.state())
    for _ in range(rounds):
        saver.wait()
        for _ in range(base_steps):
            base.append(trainer.step()["step_time_s"])
        start = time.perf_counter()
        saver.save(trainer.state())
        call = time.perf_counter() - start
        saver.stall_s = 0.0
        first = trainer.step()
        blocked.append(call + saver.stall_s)
        steps = [first["step_time_s"] - saver.stall_s]
        while not saver.done():
            steps.append(trainer.step()["step_time_s"])
        saver.wait()
        during += steps
        writes.append(dict(saver.last_write))
    seconds = [w["seconds"] for w in writes]
    nbytes = writes[-1]["bytes"]
    return {"blocked_s": statistics.median(blocked), "blocked_min_s": min(blocked), "blocked_max_s": max(blocked),
            "write_s": statistics.median(seconds), "write_bytes": nbytes,
            "write_gbps": nbytes / statistics.median(seconds) / 1e9,
            "base_step_s": statistics.median(base), "step_during_write_s": statistics.median(during),
            "slowdown_during_write": statistics.median(during) / statistics.median(base) - 1.0}


def run_stall(args) -> dict:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from disk import disk_write_bandwidth

    base = Path(args.dir or tempfile.mkdtemp(prefix="plait-ckpt-stall-"))
    base.mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized():  # DCP's async_save wants a process group, even of one
        dist.init_process_group("gloo", init_method=f"file://{base / 'store'}", rank=0, world_size=1)
    trainer = stall_trainer(args, base)
    n_params = sum(p.numel() for p in trainer.named_params.values())
    trainer.step()  # AdamW state exists from here on
    rows = {}
    try:
        savers = {"plait sync": checkpointer(trainer, base / "sync", False),
                  "plait async": checkpointer(trainer, base / "async", True),
                  "DCP async_save": DCPAsync(trainer, base / "dcp")}
        for name, saver in savers.items():
            rows[name] = measure_stall(trainer, saver, args.rounds)
            saver.close()
        disk_bps, how = disk_write_bandwidth(str(base), rows["plait async"]["write_bytes"])
    finally:
        trainer.close()
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    sync, plait, dcp_row = rows["plait sync"], rows["plait async"], rows["DCP async_save"]
    summary = {"params": n_params, "checkpoint_bytes": plait["write_bytes"], "disk_gbps": disk_bps / 1e9,
               "disk_how": how, "async_stall_s": plait["blocked_s"], "sync_save_s": sync["blocked_s"],
               "dcp_async_stall_s": dcp_row["blocked_s"],
               "async_stall_over_sync_save": plait["blocked_s"] / sync["blocked_s"],
               "async_stall_over_dcp_stall": plait["blocked_s"] / dcp_row["blocked_s"],
               "async_stall_steps": plait["blocked_s"] / plait["base_step_s"],
               "async_write_over_disk": plait["write_gbps"] * 1e9 / disk_bps,
               "slowdown_during_async_write": plait["slowdown_during_write"]}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{args.threads} thread(s)"
    print(f"save stall: {n_params / 1e6:.0f}M params + AdamW state ({plait['write_bytes'] / 1e9:.2f} GB of "
          f"checkpoint), {device}, {args.rounds} rounds; disk {disk_bps / 1e9:.2f} GB/s ({how})")
    print(f"{'contender':16s} {'blocked s':>10s} {'(min-max)':>15s} {'write s':>8s} {'GB/s':>6s} {'x disk':>7s} "
          f"{'base step s':>11s} {'during write':>12s}")
    for name, row in rows.items():
        print(f"{name:16s} {row['blocked_s']:10.3f} ({row['blocked_min_s']:.3f}-{row['blocked_max_s']:.3f}) "
              f"{row['write_s']:8.2f} {row['write_gbps']:6.2f} {row['write_gbps'] * 1e9 / disk_bps:7.2f} "
              f"{row['base_step_s']:11.3f} {row['slowdown_during_write']:+11.1%}")
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return {"benchmark": "checkpoint_stall", "device": device, "rows": [{"contender": k, **v} for k, v in rows.items()],
            "summary": summary}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["stall", "throughput", "both"], default="both")
    parser.add_argument("--stall-dim", type=int, default=1024)
    parser.add_argument("--stall-layers", type=int, default=8)
    parser.add_argument("--stall-preset", choices=["none", "1b"], default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {}
    if args.part in ("stall", "both"):
        result["stall"] = run_stall(args)
    if args.part in ("throughput", "both"):
        result["throughput"] = run_throughput(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result if args.part == "both" else result[args.part], indent=2))
    return result


def run_throughput(args) -> dict:
    cfg, model, optimizer = build_state(args.dim, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    runners = {"plait": Plait(cfg, model, optimizer), "plait-nohash": Plait(cfg, model, optimizer, verify=False),
               "torch.save": TorchSave(model, optimizer), "torch.dcp": TorchDCP(model, optimizer)}
    times = {name: {"save": [], "load": []} for name in CONTENDERS}
    sizes = {}
    base = Path(args.dir or tempfile.mkdtemp(prefix="plait-ckpt-bench-"))
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        for round_index in range(args.rounds + 1):  # round 0 warms up (imports, first allocations)
            for name in CONTENDERS:
                root = base / name.replace(".", "_")
                shutil.rmtree(root, ignore_errors=True)
                start = time.perf_counter()
                runners[name].save(root)
                saved = time.perf_counter()
                with torch.no_grad():
                    for p in model.parameters():
                        p.zero_()
                runners[name].load(root)
                loaded = time.perf_counter()
                for pname, p in model.named_parameters():
                    assert torch.equal(p, reference[pname]), f"{name} did not restore {pname}"
                sizes[name] = dir_bytes(root)
                if round_index > 0:
                    times[name]["save"].append(saved - start)
                    times[name]["load"].append(loaded - saved)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    rows = []
    for name in CONTENDERS:
        for op in ("save", "load"):
            rates = [sizes[name] / t / 1e9 for t in times[name][op]]
            rows.append({"contender": name, "op": op, "bytes": sizes[name], "gbps_median": statistics.median(rates),
                         "gbps_min": min(rates), "gbps_max": max(rates),
                         "seconds_median": statistics.median(times[name][op])})
    by = {(r["contender"], r["op"]): r["gbps_median"] for r in rows}
    summary = {f"{op}_plait_over_{peer}": by[("plait", op)] / by[(peer, op)]
               for op in ("save", "load") for peer in ("torch.save", "torch.dcp")}
    summary.update({f"{op}_gbps_plait": by[("plait", op)] for op in ("save", "load")})
    print(f"checkpoint of {n_params / 1e6:.1f}M params + AdamW state, {args.rounds} rounds, {args.threads} thread(s)")
    print(f"{'contender':14s} {'op':5s} {'MB':>8s} {'GB/s med':>9s} {'min':>7s} {'max':>7s}")
    for r in rows:
        print(f"{r['contender']:14s} {r['op']:5s} {r['bytes'] / 1e6:8.1f} {r['gbps_median']:9.3f} "
              f"{r['gbps_min']:7.3f} {r['gbps_max']:7.3f}")
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    return {"benchmark": "checkpoint", "device": "cpu", "params": n_params, "rounds": args.rounds,
            "rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
