"""Checkpoint save and load throughput: plait's safetensors shards against torch.save and
torch.distributed.checkpoint, on the same model and AdamW state, in the same run.

One process (tp=1), a LLaMA-shaped model with AdamW state after one step (params + 2
moments, fp32). Each round saves and then loads once with every contender, in turn:
  - plait: safetensors + index, CRC-32 of every file on save and checked on load, fsync
    and rename (what `train.resume` does),
  - plait-nohash: the same files read back without the CRC-32 check (the cost of checking),
  - torch.save / torch.load (pickle, weights_only load), no fsync,
  - torch.distributed.checkpoint (dcp.save / dcp.load, no process group), no fsync.
GB/s = checkpoint bytes on disk / wall time; medians over rounds, with min and max. Reads
come from the page cache for everyone (the files were just written), so this compares
the software paths, not the disk.

    python benchmarks/checkpoint.py --out checkpoint.json [--dim 256 --layers 4 --rounds 5]
"""

import argparse
import json
import os
import shutil
import statistics
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    result = {"benchmark": "checkpoint", "device": "cpu", "params": n_params, "rounds": args.rounds,
              "rows": rows, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
