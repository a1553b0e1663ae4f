"""Learning-rate transfer across width: muP against the standard parametrization (Lion).

For each parametrization, width and learning rate on a factor-2 grid, train a small
decoder from several seeds on the standard-library corpus and record the held-out loss.
muP's promise (Tensor Programs V): the best learning rate found at the smallest width
stays best at the largest; under the standard parametrization it drifts down with width.
Every finished run is written to `--out` as it lands (partial results survive a cut-off).

    python benchmarks/mup_transfer.py --out mup_transfer.json --png docs/mup_transfer.png

Summary figures, per parametrization: `shift_steps` (largest distance, in grid steps, of
any width's best rate from the smallest width's), `cost_at_largest` (nats lost at the
largest width by using the smallest width's best rate).
"""

import argparse
import json
import math
import os
import statistics
import time
from typing import Dict, List

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from plait.data.corpus import prepare_corpus  # noqa: E402
from plait.optim.builder import build_optimizer  # noqa: E402
from plait.optim.config import OptimConfig  # noqa: E402
from plait.optim.schedule import apply_lr  # noqa: E402
from plait.train.config import ModelConfig  # noqa: E402
from plait.train.coord_check import TokenBatches  # noqa: E402
from plait.train.build import build_model  # noqa: E402
from plait.train.parametrization import build_parametrization  # noqa: E402


def train_once(width: int, lr: float, seed: int, mup: bool, args, train_path: str, val_path: str) -> float:
    """Held-out loss (nats/token) after `args.steps` Lion steps; inf if training diverged."""
    model_cfg = ModelConfig(dim=width, n_layers=args.layers, n_heads=args.heads, base_dim=args.base_dim,
                            max_seq_len=args.seq_len)
    optim_cfg = OptimConfig(name="lion", lr=lr, betas=[0.9, 0.99], weight_decay=args.weight_decay,
                            warmup_steps=args.steps // 10, schedule="cosine", grad_clip=1.0, impl="auto", mup=mup)
    param = build_parametrization(model_cfg, optim_cfg)
    torch.manual_seed(seed)
    model = build_model(model_cfg, seed=seed, scales=param.scales, std_of=param.std_of)
    optimizer = build_optimizer(dict(model.named_parameters()), optim_cfg, param.group_of)
    batches = TokenBatches(train_path, args.seq_len, args.batch, seed)
    for step in range(args.steps):
        apply_lr(optimizer, step, args.steps, optim_cfg)
        tokens = batches(step)
        loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
        if not math.isfinite(float(loss)):
            return float("inf")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    held_out = TokenBatches(val_path, args.seq_len, args.batch, 12345)  # the same batches for every run
    with torch.no_grad():
        losses = [float(model.loss(model(t[:, :-1]), t[:, 1:])) for t in (held_out(i) for i in range(args.eval_batches))]
    value = sum(losses) / len(losses)
    return value if math.isfinite(value) else float("inf")


def summarize(results: List[Dict], widths: List[int]) -> Dict:
    """Best rate per width (argmin of the seed-mean loss), its drift, and the cost of transferring it."""
    summary = {}
    for label in ("muP", "standard"):
        means: Dict[int, Dict[float, float]] = {}
        for width in widths:
            by_lr: Dict[float, List[float]] = {}
            for r in results:
                if r["param"] == label and r["width"] == width:
                    by_lr.setdefault(r["lr"], []).append(r["loss"])
            if by_lr:
                means[width] = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        done = [w for w in widths if w in means]
        if len(done) < 2:
            continue
        best = {w: min(means[w], key=means[w].get) for w in done}
        small, large = done[0], done[-1]
        shift = max(abs(math.log2(best[w] / best[small])) for w in done)
        cost = means[large].get(best[small], float("nan")) - means[large][best[large]]
        summary[label] = {"best_lr": {str(w): best[w] for w in done}, "shift_steps": shift,
                          "cost_at_largest": cost, "widths": done,
                          "mean_loss": {str(w): {str(lr): v for lr, v in means[w].items()} for w in done}}
    return summary


def plot(summary: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in ("muP", "standard") if label in summary]
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], labels):
        for width in summary[label]["widths"]:
            curve = summary[label]["mean_loss"][str(width)]
            lrs = sorted(curve, key=float)
            ax.plot([float(lr) for lr in lrs], [curve[lr] for lr in lrs], marker="o", ms=3, label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate (base)")
        ax.set_title(f"{label}: shift {summary[label]['shift_steps']:.0f} steps, "
                     f"cost {summary[label]['cost_at_largest']:.3f} nats")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_json(path: str, payload: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--base-dim", type=int, default=64)
    parser.add_argument("--mup-lr-exps", type=int, nargs="+", default=[-10, -9, -8, -7, -6],
                        help="log2 of the muP learning rates")
    parser.add_argument("--sp-lr-exps", type=int, nargs="+", default=[-12, -11, -10, -9, -8],
                        help="log2 of the standard-parametrization learning rates")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--png", default="mup_transfer.png")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replot", default=None, help="summarize and plot the rows of an earlier --out JSON")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            rows = json.load(f)["rows"]
        counts = {seed: sum(r["seed"] == seed for r in rows) for seed in {r["seed"] for r in rows}}
        rows = [r for r in rows if counts[r["seed"]] == max(counts.values())]  # complete seeds only
        summary = summarize(rows, sorted({r["width"] for r in rows}))
        plot(summary, args.png)
        print(json.dumps({k: {m: v[m] for m in ("best_lr", "shift_steps", "cost_at_largest")}
                          for k, v in summary.items()}, indent=1))
        return summary
    torch.set_num_threads(args.threads)
    train_path, val_path = (str(p) for p in prepare_corpus(None, args.cache_dir, 0.02))
    grids = {"muP": [2.0 ** e for e in args.mup_lr_exps], "standard": [2.0 ** e for e in args.sp_lr_exps]}
    results: List[Dict] = []
    at_base: Dict = {}
    start = time.perf_counter()
    for seed in range(args.seeds):  # seeds outermost: a cut-off run still covers every width and rate
        for width in args.widths:
            for label, lrs in grids.items():
                for lr in lrs:
                    t0 = time.perf_counter()
                    key = (width, lr, seed)
                    if width == args.base_dim and key in at_base:  # at the base width muP is the standard model
                        loss = at_base[key]
                    else:
                        loss = train_once(width, lr, seed, label == "muP", args, train_path, val_path)
                    if width == args.base_dim:
                        at_base[key] = loss
                    results.append({"param": label, "width": width, "lr": lr, "seed": seed, "loss": loss,
                                    "seconds": time.perf_counter() - t0})
                    print(f"seed {seed} width {width:5d} {label:8s} lr 2^{math.log2(lr):+.0f} loss {loss:.4f} "
                          f"({time.perf_counter() - t0:.1f}s, total {time.perf_counter() - start:.0f}s)", flush=True)
            if args.out:
                write_json(args.out, {"benchmark": "mup_transfer", "device": f"cpu x{args.threads} threads",
                                      "settings": vars(args), "rows": results,
                                      "summary": summarize(results, args.widths)})
    summary = summarize(results, args.widths)
    print(f"\n{'param':10s} " + " ".join(f"{'best@' + str(w):>10s}" for w in args.widths) + "  shift  cost")
    for label, s in summary.items():
        cells = " ".join(f"{s['best_lr'].get(str(w), float('nan')):10.2e}" for w in args.widths)
        print(f"{label:10s} {cells}  {s['shift_steps']:5.1f}  {s['cost_at_largest']:.3f}")
    flat = {f"{label}_{key}": s[key] for label, s in summary.items() for key in ("shift_steps", "cost_at_largest")}
    flat["seconds"] = time.perf_counter() - start
    payload = {"benchmark": "mup_transfer", "device": f"cpu x{args.threads} threads", "settings": vars(args),
               "rows": results, "summary": dict(summary, **flat)}
    if args.out:
        write_json(args.out, payload)
    plot(summary, args.png)
    print(f"wrote {args.png}" + (f" and {args.out}" if args.out else ""))
    return payload


if __name__ == "__main__":
    main()
