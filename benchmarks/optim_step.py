"""Optimizer step time and state bytes: plait Lion against lion-pytorch and torch AdamW.

Every contender owns its own copy of the same parameters (a model-like mix of matrices
and vectors, about `--params` in all, or `--shapes 1b`: the 146 tensors of a Llama-3.2-1B,
1.24B parameters) and reads one shared set of gradients. Contenders are stepped in turn,
round by round, so load swings on a shared machine hit them alike; the table reports the
median step time with min and max, and each contender's optimizer state in bytes.

On CUDA (`--device cuda`) each step is timed with a synchronize, lion-pytorch also runs
its Triton kernel, and the table adds Lion's floor: 20 bytes a parameter (p, g, m read,
p, m written) at the device's copy bandwidth, measured in the same run.

    python benchmarks/optim_step.py --params 100e6 --rounds 7 --out optim_step.json
    python benchmarks/optim_step.py --device cuda --shapes 1b --rounds 10 --out optim_step.json
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from plait.common.optimizer_state import state_bytes  # noqa: E402


def model_like_shapes(total: float, dim: int = 1024):
    """Shapes of a LLaMA-ish stack: per layer Q|K|V, O, gate|up, down, two norms; until ~total."""
    ffn = 8 * dim // 3
    layer = [(3 * dim, dim), (dim, dim), (2 * ffn, dim), (dim, ffn), (dim,), (dim,)]
    shapes, count = [(256 * 128, dim)], 256 * 128 * dim
    while count < total:
        for shape in layer:
            shapes.append(shape)
            count += torch.Size(shape).numel()
    return shapes


def llama_shapes(dim: int = 2048, layers: int = 16, heads: int = 32, kv_heads: int = 8, ffn: int = 8192,
                 vocab: int = 128256):
    """The parameter shapes of a Hugging Face Llama (q, k, v, o, gate, up, down, two norms a layer; tied
    embedding): the 1B preset's 146 tensors, 1.24B parameters, as the first GPU run measured them."""
    kv = dim // heads * kv_heads
    layer = [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (ffn, dim), (ffn, dim), (dim, ffn), (dim,), (dim,)]
    return [(vocab, dim)] + layer * layers + [(dim,)]


def contenders(deepspeed: bool, device: torch.device):
    import lion_pytorch

    from plait.optim.lion import Lion

    lr, wd = 1e-4, 0.1
    table = {
        "plait Lion (auto)": lambda ps: Lion(ps, lr=lr, weight_decay=wd, impl="auto"),
        "plait Lion (foreach)": lambda ps: Lion(ps, lr=lr, weight_decay=wd, impl="foreach"),
        "lion-pytorch": lambda ps: lion_pytorch.Lion(ps, lr=lr, weight_decay=wd),
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, foreach=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, fused=True),
    }
    if device.type == "cuda":
        table["plait Lion (compiled)"] = lambda ps: Lion(ps, lr=lr, weight_decay=wd, impl="compiled")
        table["lion-pytorch (triton)"] = lambda ps: lion_pytorch.Lion(ps, lr=lr, weight_decay=wd, use_triton=True)
    if deepspeed:
        table["plait Lion (deepspeed)"] = lambda ps: Lion(ps, lr=lr, weight_decay=wd, impl="deepspeed")
    return table


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes a second one device copy moves (read plus write), the best of five."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--shapes", choices=["mix", "1b"], default="mix",
                        help="mix: a model-like stack of about --params; 1b: the Llama-3.2-1B shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--deepspeed", action="store_true", help="also time DeepSpeed's CPU Lion op (JIT build)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    shapes = llama_shapes() if args.shapes == "1b" else model_like_shapes(args.params)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    base = [torch.randn(s, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]
    runs = {}
    for name, make in contenders(args.deepspeed, device).items():
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads):
            p.grad = g  # shared, read-only
        try:
            optimizer = make(params)
            for _ in range(3):  # warm-up: state allocation, compilation, autotuning
                optimizer.step()
        except Exception as error:  # a peer's optional kernel missing here: say so, time the rest
            print(f"{name}: skipped ({str(error).splitlines()[0][:120]})")
            continue
        runs[name] = {"optimizer": optimizer, "times": []}  # 1b on CUDA: about 85 GB for all contenders
    for _ in range(args.rounds):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run["optimizer"].step()
            _sync(device)
            run["times"].append(time.perf_counter() - start)
    rows = []
    for name, run in runs.items():
        times = run["times"]
        rows.append({"name": name, "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                     "max_ms": 1e3 * max(times), "state_bytes": state_bytes(run["optimizer"]),
                     "impl": getattr(run["optimizer"], "impl", "")})
    by = {row["name"]: row for row in rows}
    plait = by["plait Lion (auto)"]
    floor_ms = 1e3 * 20 * n_params / copy_bandwidth(device) if device.type == "cuda" else None
    summary = {
        "params": n_params,
        "tensors": len(shapes),
        "plait_lion_impl": plait["impl"],
        "plait_lion_ms": plait["median_ms"],
        "plait_vs_lion_pytorch": plait["median_ms"] / by["lion-pytorch"]["median_ms"],
        "plait_vs_adamw_fused": plait["median_ms"] / by["AdamW fused"]["median_ms"],
        "plait_vs_adamw_foreach": plait["median_ms"] / by["AdamW foreach"]["median_ms"],
        "state_bytes_lion_over_adamw": plait["state_bytes"] / by["AdamW fused"]["state_bytes"],
        # fastest rounds: on a crowded machine the least-disturbed step is the kernel's own speed
        "min_plait_vs_lion_pytorch": plait["min_ms"] / by["lion-pytorch"]["min_ms"],
        "min_plait_vs_adamw_fused": plait["min_ms"] / by["AdamW fused"]["min_ms"],
    }
    if floor_ms is not None:
        summary.update(lion_floor_ms=floor_ms, plait_vs_floor=plait["median_ms"] / floor_ms)
    if "lion-pytorch (triton)" in by:
        summary["plait_vs_lion_pytorch_triton"] = plait["median_ms"] / by["lion-pytorch (triton)"]["median_ms"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{args.threads} threads"
    print(f"{n_params / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors, {where}, {args.rounds} rounds")
    print(f"{'contender':24s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'state MB':>9s} {'vs plait':>9s}")
    for row in rows:
        print(f"{row['name']:24s} {row['median_ms']:10.1f} {row['min_ms']:8.1f} {row['max_ms']:8.1f} "
              f"{row['state_bytes'] / 1e6:9.1f} {row['median_ms'] / plait['median_ms']:9.2f}")
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    result = {"benchmark": "optim_step", "device": where, "rows": rows, "summary": summary}
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
