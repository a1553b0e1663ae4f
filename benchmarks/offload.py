"""Activation offload benchmark: peak resident saved-activation bytes and step time.

Contenders, stepped in turn round by round on one decoder where activations dominate
memory (same seed, same batch): plain PyTorch (no hooks), keep (hooks, everything
resident: the reference for memory), offload to each backend available (host, file,
aio; gds on CUDA), full recompute (every block checkpointed), and on CUDA
`torch.autograd.graph.save_on_cpu(pin_memory=True)`. Each step is forward and backward
over the micro-batches; the gradients of every contender are checked bitwise against
plain PyTorch. Peak saved-activation bytes come from the offload cache's counter (for
recompute: the block inputs it holds, not the one block rebuilt during its backward);
on CUDA the peak allocated memory above the model is reported too.

`offload-auto` is the host backend with `keep_last=auto` (the default): its row adds the
adaptive plan's figures, the bound (bytes the link can carry while the forward runs) and
the saving the plan reaches against it, measured as keep's peak minus its own. The file
and aio rows are set beside the disk's own write bandwidth, measured in the same run with
a plain O_DIRECT write of 256 MiB into the same directory.

    python benchmarks/offload.py --out offload.json [--rounds 3] [--path /local/nvme]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from disk import disk_write_bandwidth  # noqa: E402  (benchmarks/disk.py, beside this script)
from plait.offload import ActivationOffload, OffloadConfig, OffloadError  # noqa: E402
from plait.train.config import ModelConfig  # noqa: E402
from plait.train.build import build_model  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--path", default=None, help="directory for file/aio/gds (default: a temp dir)")
    parser.add_argument("--keep-last", default="1", help="keep_last of the fixed offload rows (auto has its own row)")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


class Contender:
    """One way of running the step: a model of its own, maybe an offload, maybe a context."""

    def __init__(self, name, model, offload=None, context=contextlib.nullcontext):
        self.name, self.model, self.offload, self.context = name, model, offload, context
        self.times, self.peaks, self.device_peaks, self.metrics = [], [], [], []
        self.grads = None

    def step(self, tokens, device):
        for param in self.model.parameters():
            param.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        scope = self.offload.step() if self.offload is not None else contextlib.nullcontext()
        with scope, self.context():
            for micro in tokens:
                logits = self.model(micro[:, :-1])
                (self.model.loss(logits, micro[:, 1:]) / tokens.shape[0]).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            self.device_peaks.append(torch.cuda.max_memory_allocated() - base)
        self.times.append(time.perf_counter() - start)
        if self.offload is not None:
            self.metrics.append(dict(self.offload.last_metrics))
            self.peaks.append(self.offload.last_metrics["offload_resident_peak_bytes"])
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def build_contenders(args, cfg, device, path):
    def model():
        return build_model(cfg, seed=0, device=device).to(device)

    common = dict(device_filter="all" if device.type == "cpu" else "cuda", min_bytes=65536,
                  keep_last=args.keep_last, prefetch=args.prefetch, path=path, threads=2)
    contenders = [Contender("plain", model())]

    def with_offload(name, **settings):
        chunk = model()
        try:
            offload = ActivationOffload(OffloadConfig(**{**common, **settings}), None, device)
        except OffloadError as error:
            print(f"skipping {name}: {error}")
            return
        offload.attach(chunk)
        contenders.append(Contender(name, chunk, offload))

    with_offload("keep", backend="host", policy="keep")
    backends = ["host", "file", "aio"] + (["gds"] if device.type == "cuda" else [])
    for backend in backends:
        with_offload(f"offload-{backend}", backend=backend, policy="offload")
    with_offload("offload-auto", backend="host", policy="offload", keep_last="auto")
    with_offload("recompute", backend="host", policy="recompute", keep_last=0)
    if device.type == "cuda":
        contenders.append(Contender("save_on_cpu", model(),
                                    context=lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)))
    return contenders


def summarize(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(name="offload-bench", vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=4,
                      max_seq_len=args.seq)
    tokens = torch.randint(0, 256, (args.micro, args.batch, args.seq + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)
    path = args.path or tempfile.mkdtemp(prefix="plait-offload-bench-")
    disk_bw, disk_how = disk_write_bandwidth(path)
    contenders = build_contenders(args, cfg, device, path)
    for round_index in range(args.warmup + args.rounds):
        for contender in contenders:
            contender.step(tokens, device)
            if round_index < args.warmup:
                contender.times.clear(), contender.peaks.clear(), contender.device_peaks.clear()
                contender.metrics.clear()

    plain = contenders[0]
    by_name = {c.name: c for c in contenders}
    keep_peak = statistics.median(by_name["keep"].peaks)
    keep_time = statistics.median(by_name["keep"].times)
    plain_time = statistics.median(plain.times)
    rows = []
    for c in contenders:
        time_stats = summarize(c.times)
        peak = statistics.median(c.peaks) if c.peaks else None
        last = c.metrics[-1] if c.metrics else {}
        rows.append({
            "contender": c.name, "step_s": time_stats, "time_vs_keep": time_stats["median"] / keep_time,
            "time_vs_plain": time_stats["median"] / plain_time, "resident_peak_bytes": peak,
            "activation_memory_vs_keep": peak / keep_peak if peak is not None else None,
            "device_peak_bytes": summarize(c.device_peaks),
            "grads_bitwise_equal_plain": all(torch.equal(c.grads[n], plain.grads[n]) for n in plain.grads),
            "written_bytes": last.get("offload_written_bytes"), "read_bytes": last.get("offload_read_bytes"),
            "deduplicated_bytes": last.get("offload_deduplicated_bytes"),
            "from_memory_bytes": last.get("offload_from_memory_bytes"),
            "io_s": last.get("offload_io_s"), "exposed_s": last.get("offload_exposed_s"),
        })
        if c.name in ("offload-file", "offload-aio") and last.get("offload_written_bytes"):
            # the step's extra time over keep, against the time the disk alone needs for the bytes written
            extra = time_stats["median"] - keep_time
            rows[-1]["disk_seconds_for_written"] = last["offload_written_bytes"] / disk_bw
            rows[-1]["extra_time_over_disk_time"] = extra / rows[-1]["disk_seconds_for_written"]
        if "offload_bound_bytes" in last:
            rows[-1].update(link_bytes_per_s=last["offload_link_bytes_per_s"], bound_bytes=last["offload_bound_bytes"],
                            planned_bytes=last["offload_planned_bytes"],
                            blocks_offloaded=last["offload_blocks_offloaded"],
                            saved_bytes=keep_peak - peak, saving_vs_bound=(keep_peak - peak) / max(
                                last["offload_bound_bytes"], 1))
    print(f"device {device}, {args.layers} layers x dim {args.dim}, {args.micro} micro-batches of "
          f"{args.batch} x {args.seq}, {args.threads} thread(s), {args.rounds} rounds (median [min, max])")
    print(f"{'contender':<14} {'step s':>22} {'vs keep':>8} {'peak saved MB':>14} {'mem vs keep':>11} "
          f"{'written MB':>10} {'exposed s':>9} {'bitwise':>7}")
    for row in rows:
        s = row["step_s"]
        peak = row["resident_peak_bytes"]
        print(f"{row['contender']:<14} {s['median']:7.3f} [{s['min']:.3f}, {s['max']:.3f}] {row['time_vs_keep']:8.2f} "
              f"{(peak or 0) / 2**20:14.1f} {row['activation_memory_vs_keep'] or float('nan'):11.2f} "
              f"{(row['written_bytes'] or 0) / 2**20:10.1f} {row['exposed_s'] or 0:9.3f} "
              f"{str(row['grads_bitwise_equal_plain']):>7}")
    print(f"disk: {disk_bw / 1e9:.2f} GB/s ({disk_how} write of 256 MiB in {path})")
    for row in rows:
        if "bound_bytes" in row:
            print(f"{row['contender']}: {row['blocks_offloaded']} of {args.layers} blocks offloaded, link "
                  f"{row['link_bytes_per_s'] / 1e9:.2f} GB/s, bound {row['bound_bytes'] / 2**20:.1f} MiB, "
                  f"saved {row['saved_bytes'] / 2**20:.1f} MiB = {row['saving_vs_bound']:.2f} x bound")
        if "disk_seconds_for_written" in row:
            print(f"{row['contender']}: extra step time over keep = {row['extra_time_over_disk_time']:.2f} x the "
                  f"disk's own time for the {row['written_bytes'] / 2**20:.0f} MiB written")
    summary = {"keep_over_plain_time": keep_time / plain_time, "disk_bytes_per_s": disk_bw}
    for row in rows:
        if "saving_vs_bound" in row:
            summary[f"{row['contender']}_saving_vs_bound"] = row["saving_vs_bound"]
        if "extra_time_over_disk_time" in row:
            summary[f"{row['contender']}_extra_time_over_disk_time"] = row["extra_time_over_disk_time"]
        if row["contender"].startswith("offload-") or row["contender"] == "recompute":
            summary[f"{row['contender']}_memory_reduction_vs_keep"] = 1 - row["activation_memory_vs_keep"]
            summary[f"{row['contender']}_time_vs_keep"] = row["time_vs_keep"]
            summary[f"{row['contender']}_time_vs_plain"] = row["time_vs_plain"]
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    result = {"benchmark": "offload", "device": str(device) if device.type == "cpu"
              else torch.cuda.get_device_name(device), "rows": rows, "summary": summary,
              "config": vars(args), "disk": {"bytes_per_s": disk_bw, "how": disk_how}}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    for contender in contenders:
        if contender.offload is not None:
            contender.offload.close()


if __name__ == "__main__":
    main()
