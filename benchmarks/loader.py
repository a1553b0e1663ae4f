"""Loader throughput: plait's loader against torch's DataLoader and a nanoGPT-style loop, side by side.

A corpus of at least 100M uint16 tokens is made in a temporary directory by repeating the
standard-library tokens (deleted afterwards). Every contender produces int64 batches of
`--batch` windows of `--seq-len`+1 tokens at random positions:

- plait: `Loader.batch(step)` (keyed permutation, one strided gather, no workers);
- DataLoader, map-style dataset of windows, RandomSampler, num_workers 0 and 2;
- nanoGPT-style: `torch.randint` offsets and `torch.stack` of per-row numpy slices.

Contenders run in turn, `--batches` each per round, for `--rounds` rounds; the table gives
median (min-max) batches/s and CPU time per batch (DataLoader workers' CPU included).
Time to first batch counts construction (mapping files, building samplers) plus the first
batch. With a GPU, the unified-tensor gather (the GPU reads pinned host memory in place) is
compared with a CPU gather followed by a host-to-device copy.

    python benchmarks/loader.py --out loader.json
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
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from plait.data.corpus import prepare_corpus  # noqa: E402
from plait.data.dataset import OpenShard, TokenDataset, TokenSpan  # noqa: E402
from plait.data.loader import Loader  # noqa: E402
from plait.data.shards import ShardWriter, TokenShard  # noqa: E402


def make_corpus(directory: Path, min_tokens: int) -> Path:
    """`directory/big.{bin,idx}`: the stdlib train tokens repeated until there are at least `min_tokens`."""
    train_bin, _ = prepare_corpus(None, None, 0.02)
    base = np.fromfile(train_bin, dtype=np.uint16)
    writer = ShardWriter(directory / "big", np.uint16)
    while writer.tokens < min_tokens:
        writer.add(base)
    writer.close()
    return directory / "big"


class Windows(torch.utils.data.Dataset):
    """Map-style dataset: window i = tokens [i*stride, i*stride + seq_len + 1) as int64 (the usual recipe)."""

    def __init__(self, path: Path, seq_len: int, stride: int):
        self.path, self.seq_len, self.stride = path, seq_len, stride
        self.tokens = None
        self.count = (os.path.getsize(path) // 2 - seq_len - 1) // stride + 1

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if self.tokens is None:  # opened lazily, so each worker maps the file itself
            self.tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        start = i * self.stride
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Contender:
    def __init__(self, name, make):
        self.name, self.make = name, make
        self.rates, self.cpu = [], []
        start = time.perf_counter()
        self.next = make()
        self.next()
        self.first_batch_s = time.perf_counter() - start
        self.workers = []

    def cpu_time(self) -> float:
        total = time.process_time()
        for pid in self.workers:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def run(self, batches: int, sync) -> None:
        cpu, start = self.cpu_time(), time.perf_counter()
        for _ in range(batches):
            self.next()
        sync()
        elapsed = time.perf_counter() - start
        self.rates.append(batches / elapsed)
        self.cpu.append((self.cpu_time() - cpu) / batches)


def dataloader(path, seq_len, batch, workers, seed, stride):
    def make():
        loader = torch.utils.data.DataLoader(Windows(path, seq_len, stride), batch_size=batch, shuffle=True,
                                             num_workers=workers, generator=torch.Generator().manual_seed(seed),
                                             persistent_workers=workers > 0)
        iterator = iter(loader)

        def step():
            nonlocal iterator
            try:
                return next(iterator)
            except StopIteration:
                iterator = iter(loader)
                return next(iterator)
        step.iterator = lambda: iterator
        return step
    return make


def nanogpt(path, seq_len, batch):
    def make():
        def step():
            data = np.memmap(path, dtype=np.uint16, mode="r")  # nanoGPT re-maps every batch
            ix = torch.randint(len(data) - seq_len - 1, (batch,))
            return torch.stack([torch.from_numpy(data[i:i + seq_len + 1].astype(np.int64)) for i in ix])
        return step
    return make


def plait(prefix, seq_len, batch, seed, device="cpu", mode="auto"):
    def make():
        shard = OpenShard(TokenShard(prefix), torch.device(device), mode)
        dataset = TokenDataset([TokenSpan(shard, 0, len(shard.shard))], seq_len)
        loader = Loader(dataset, None, seq_len, batch, 1, seed=seed, device=torch.device(device))
        counter = iter(range(1 << 62))
        return lambda: loader.batch(next(counter))
    return make


def summarize(contenders, reference):
    rows = []
    for c in contenders:
        rows.append({"name": c.name, "batches_per_s": statistics.median(c.rates), "min": min(c.rates),
                     "max": max(c.rates), "cpu_ms_per_batch": 1e3 * statistics.median(c.cpu),
                     "first_batch_s": c.first_batch_s,
                     "vs_" + reference.name: statistics.median(c.rates) / statistics.median(reference.rates)})
    return rows


def print_table(title, rows):
    print(f"\n{title}")
    keys = [k for k in rows[0] if k != "name"]
    print(f"{'contender':<28}" + "".join(f"{k:>20}" for k in keys))
    for row in rows:
        print(f"{row['name']:<28}" + "".join(f"{row[k]:>20.4g}" for k in keys))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=300, help="batches per contender per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stride", type=int, default=0,
                        help="DataLoader window stride (default seq_len; 1 = every token offset, whose RandomSampler "
                             "builds a permutation of ~all tokens first: seconds and GBs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = Path(tempfile.mkdtemp(prefix="plait-loader-bench-"))
    try:
        prefix = make_corpus(directory, args.tokens)
        tokens = os.path.getsize(f"{prefix}.bin") // 2
        print(f"corpus: {tokens:,} tokens ({tokens * 2 / 1e6:.0f} MB) in {directory}; batch {args.batch} x "
              f"{args.seq_len + 1}, {args.threads} thread(s), {args.rounds} rounds x {args.batches} batches")
        result = {"benchmark": "loader", "device": "cpu", "tokens": tokens, "seq_len": args.seq_len,
                  "batch": args.batch, "threads": args.threads, "rows": [], "summary": {}}
        cpu_rows = run_cpu(args, prefix, result)
        print_table("CPU (median (min-max) batches/s over rounds)", cpu_rows)
        if torch.cuda.is_available():
            gpu_rows = run_gpu(args, prefix, result)
            print_table(f"GPU: {torch.cuda.get_device_name()}", gpu_rows)
        print("\nsummary:", json.dumps(result["summary"], indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_cpu(args, prefix, result):
    bin_path = Path(f"{prefix}.bin")
    stride = args.stride or args.seq_len
    anon = rss_anon()
    ours = Contender("plait", plait(prefix, args.seq_len, args.batch, 0))
    for _ in range(args.rounds * args.batches):
        ours.next()
    plait_growth = rss_anon() - anon  # anonymous memory after construction and a run's worth of batches
    contenders = [ours,
                  Contender("DataLoader workers=0", dataloader(bin_path, args.seq_len, args.batch, 0, 0, stride)),
                  Contender("DataLoader workers=2", dataloader(bin_path, args.seq_len, args.batch, 2, 0, stride)),
                  Contender("nanoGPT-style", nanogpt(bin_path, args.seq_len, args.batch))]
    contenders[2].workers = [w.pid for w in contenders[2].next.iterator()._workers]
    for _ in range(args.rounds):
        for c in contenders:
            c.run(args.batches, lambda: None)
    rows = summarize(contenders, contenders[1])
    result["rows"] += [{**r, "device": "cpu"} for r in rows]
    rate = {c.name: statistics.median(c.rates) for c in contenders}
    cpu = {c.name: statistics.median(c.cpu) for c in contenders}
    short = {"DataLoader workers=0": "dataloader0", "DataLoader workers=2": "dataloader2", "nanoGPT-style": "nanogpt"}
    result["summary"].update({f"plait_cpu_saving_vs_{v}": cpu[k] / cpu["plait"] for k, v in short.items()})
    result["summary"].update({
        "plait_vs_dataloader0": rate["plait"] / rate["DataLoader workers=0"],
        "plait_vs_dataloader2": rate["plait"] / rate["DataLoader workers=2"],
        "plait_vs_nanogpt": rate["plait"] / rate["nanoGPT-style"],
        "plait_first_batch_s": ours.first_batch_s,
        "dataloader0_first_batch_s": contenders[1].first_batch_s,
        "plait_anon_memory_growth_mb": plait_growth / 1e6,
        "plait_cpu_ms_per_batch": 1e3 * statistics.median(ours.cpu)})
    return rows


def run_gpu(args, prefix, result):
    sync = torch.cuda.synchronize
    unified = Contender("plait unified (GPU gather)", plait(prefix, args.seq_len, args.batch, 0, "cuda", "unified"))
    staged = Contender("CPU gather + H2D copy", plait(prefix, args.seq_len, args.batch, 0, "cuda", "staged"))
    for _ in range(args.rounds):
        for c in (unified, staged):
            c.run(args.batches, sync)
    rows = summarize([unified, staged], staged)
    result["rows"] += [{**r, "device": torch.cuda.get_device_name()} for r in rows]
    result["device"] = f"cpu + {torch.cuda.get_device_name()}"
    result["summary"]["gpu_unified_vs_staged"] = statistics.median(unified.rates) / statistics.median(staged.rates)
    return rows


if __name__ == "__main__":
    sys.exit(main())
