"""`plait plot RUN [RUN ...]`: the loss curves of runs, read from their `metrics.jsonl`, as one PNG and a table.

A run is a run directory (or its `metrics.jsonl`): rank 0's records, `loss` (and `lr`,
`tokens_per_s`, ...) on logged steps and `val_loss` on evaluation steps. A step recorded
twice (a log written before plait cut a resumed run's log back to its checkpoint) keeps
its last record, the one the run went on from; a last line still being written is left
out. The PNG draws each run's training loss against the step, its validation loss as dots,
and with `--lr` the learning rate in a second panel; `--smooth a` draws the training loss
as an exponential moving average (a = 0.9 keeps 90% of the running value). The table
gives, per run: steps logged, the last loss, the best validation loss and its step, and
the median tokens/s.

    plait plot outputs/2026-12-05/10-00-00 outputs/2026-12-05/11-30-00 --out loss.png
"""

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from plait.common.paths import unwritable_reason


class RunError(ValueError):
    """A run that cannot be read, in one sentence naming it."""


@dataclass
class Curves:
    """One run's series, by step (each step once, in order)."""

    name: str
    loss: Dict[int, float] = field(default_factory=dict)
    val_loss: Dict[int, float] = field(default_factory=dict)
    lr: Dict[int, float] = field(default_factory=dict)
    tokens_per_s: Dict[int, float] = field(default_factory=dict)


def metrics_file(run: str) -> Path:
    """The `metrics.jsonl` of a run directory (or the file itself)."""
    path = Path(run).expanduser()
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise RunError(f"{run} holds no metrics.jsonl; pass a run directory (train.run_dir) or its metrics.jsonl.")
    return path


def read_run(run: str, name: Optional[str] = None) -> Curves:
    """A run's series; a later record of a step replaces an earlier one."""
    path = metrics_file(run)
    curves = Curves(name or (path.parent.name if path.name == "metrics.jsonl" else path.stem))
    text = path.read_text()
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break  # the last record of a run still writing it
            raise RunError(f"{path} line {number} is not JSON; was the file cut short by a full disk?") from None
        step = int(record.get("step", 0))
        for key in ("loss", "val_loss", "lr", "tokens_per_s"):
            if key in record:
                getattr(curves, key)[step] = float(record[key])
    if not curves.loss and not curves.val_loss:
        raise RunError(f"{path} has no loss records yet; plot it once the run has logged a step.")
    return curves


def summary(curves: Curves) -> Dict[str, Optional[float]]:
    """Steps logged, the last loss, the best validation loss and its step, the median tokens/s."""
    steps = sorted(curves.loss)
    best = min(curves.val_loss.items(), key=lambda item: item[1]) if curves.val_loss else (None, None)
    return {"steps": steps[-1] if steps else 0, "last_loss": curves.loss[steps[-1]] if steps else None,
            "best_val_loss": best[1], "best_val_step": best[0],
            "median_tokens_per_s": statistics.median(curves.tokens_per_s.values()) if curves.tokens_per_s else None}


def smoothed(values: List[float], keep: float) -> List[float]:
    """The exponential moving average of `values`, bias-corrected (its first point is the first value)."""
    out, average, weight = [], 0.0, 0.0
    for value in values:
        average = keep * average + (1.0 - keep) * value
        weight = keep * weight + (1.0 - keep)
        out.append(average / weight)
    return out


def plot(runs: List[Curves], path: str, smooth: float = 0.0, with_lr: bool = False) -> None:
    """The PNG: training loss (smoothed if asked) and validation dots per run, the lr below if asked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if with_lr else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3.6 * panels), squeeze=False, sharex=True)
    loss_axis = axes[0][0]
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        steps = sorted(run.loss)
        values = [run.loss[s] for s in steps]
        loss_axis.plot(steps, smoothed(values, smooth) if smooth else values, color=color, lw=1.2,
                       label=f"{run.name} train")
        if run.val_loss:
            val_steps = sorted(run.val_loss)
            loss_axis.plot(val_steps, [run.val_loss[s] for s in val_steps], "o", color=color, ms=4,
                           label=f"{run.name} val")
        if with_lr and run.lr:
            lr_steps = sorted(run.lr)
            axes[1][0].plot(lr_steps, [run.lr[s] for s in lr_steps], color=color, lw=1.2, label=run.name)
    loss_axis.set_ylabel("loss (nats/token)" + (f", EMA {smooth:g}" if smooth else ""))
    loss_axis.grid(alpha=0.3)
    loss_axis.legend(fontsize=7)
    if with_lr:
        axes[1][0].set_ylabel("learning rate")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"  # written whole, then moved into place: no half-written PNG
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def format_table(runs: List[Curves]) -> str:
    header = f"{'run':<28} {'steps':>6} {'last loss':>10} {'best val':>9} {'at step':>8} {'tok/s':>10}"
    lines = [header]
    for run in runs:
        row = summary(run)
        number = lambda value, spec: format(value, spec) if value is not None else "-"  # noqa: E731
        lines.append(f"{run.name[:28]:<28} {row['steps']:>6} {number(row['last_loss'], '.4f'):>10} "
                     f"{number(row['best_val_loss'], '.4f'):>9} {number(row['best_val_step'], 'd'):>8} "
                     f"{number(row['median_tokens_per_s'], ',.0f'):>10}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plait plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (or their metrics.jsonl)")
    parser.add_argument("--out", default="loss.png", help="the PNG to write")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA of the training loss, in [0, 1)")
    parser.add_argument("--lr", action="store_true", help="add a panel with the learning rate")
    args = parser.parse_args(argv)
    try:
        if not 0.0 <= args.smooth < 1.0:
            raise RunError(f"--smooth {args.smooth} must be in [0, 1); 0.9 keeps 90% of the running value.")
        folder = os.path.dirname(os.path.abspath(args.out))
        why = unwritable_reason(folder)
        if why:
            raise RunError(f"--out {args.out} cannot be written ({why}); pick a writable folder.")
        files = [metrics_file(run) for run in args.runs]
        names = [path.parent.name for path in files]
        if len(set(names)) < len(names):  # two runs of one name (two dates' 10-00-00): their whole paths
            names = [str(path.parent) for path in files]
        runs = [read_run(str(path), name) for path, name in zip(files, names)]
    except RunError as error:
        print(f"plait plot: error: {error}", file=sys.stderr)
        return 2
    print(format_table(runs))
    os.makedirs(folder, exist_ok=True)
    plot(runs, args.out, args.smooth, args.lr)
    print(f"wrote {args.out}")
    return 0
