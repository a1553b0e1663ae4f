"""Training variants of one job side by side: the trainers stepped in turn in one process (so load swings hit
them alike), validation loss every few steps, and a PNG of the validation curves. muon.py, moe.py and mtp.py use
it."""

import statistics
from pathlib import Path
from typing import Dict, List, Sequence


def train_in_turn(variants: Dict[str, List[str]], steps: int, eval_every: int, run_root: Path,
                  metrics: Sequence[str] = ()) -> Dict[str, Dict]:
    """{variant: {"val": [(step, val_loss)], "loss": [...], "tokens_per_s": [...], "params": n, and each of
    `metrics` the steps logged: [...]}} of the default job with each variant's overrides, `steps` steps each."""
    from plait.train import Trainer, load_config

    trainers, curves = {}, {}
    for name, overrides in variants.items():
        cfg = load_config(list(overrides) + [f"train.steps={steps}", "train.progress=false", "train.eval_every=0",
                                             f"train.run_dir={run_root / name.replace(' ', '-')}",
                                             "checkpoint.save_final=false"])
        trainers[name] = Trainer(cfg)
        curves[name] = {"val": [], "loss": [], "tokens_per_s": [], **{key: [] for key in metrics},
                        "params": sum(p.numel() for p in trainers[name].model.parameters())}
    for step in range(1, steps + 1):
        for name, trainer in trainers.items():
            record = trainer.step()
            curves[name]["tokens_per_s"].append(record["tokens_per_s"])
            curves[name]["loss"].append(record["loss"])
            for key in metrics:
                curves[name][key].append(record.get(key))  # None where a variant does not log it
            if step % eval_every == 0 or step == steps:
                curves[name]["val"].append((step, trainer.evaluate()))
        if step % eval_every == 0:
            print(f"step {step}: " + ", ".join(f"{n} val_loss {c['val'][-1][1]:.4f}" for n, c in curves.items()),
                  flush=True)
    for trainer in trainers.values():
        trainer.close()
    return curves


def plot_validation(curves: Dict[str, Dict], path: str, with_params: bool = False) -> None:
    """The variants' validation curves in one PNG (each labelled with its parameter count if asked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        steps, values = zip(*curve["val"])
        label = f"{name} ({curve['params'] / 1e6:.1f}M parameters)" if with_params else name
        axis.plot(steps, values, marker="o", label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title("model=tiny on the standard library's text")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def training_rows(curves: Dict[str, Dict], peer: str) -> List[Dict]:
    """Each variant's last validation loss and median tokens/s, and both against the `peer` variant's."""
    peer_val, peer_rate = curves[peer]["val"][-1][1], statistics.median(curves[peer]["tokens_per_s"])
    rows = []
    for name, curve in curves.items():
        val, rate = curve["val"][-1][1], statistics.median(curve["tokens_per_s"])
        rows.append({"variant": name, "params": curve["params"], "val_loss": val, "val_vs_peer": val / peer_val,
                     "tokens_per_s": rate, "throughput_vs_peer": rate / peer_rate})
    return rows


def training_line(row: Dict, width: int) -> str:
    """A training row as a table line: variant, parameters, val_loss and its ratio, tokens/s and its ratio."""
    return (f"{row['variant']:>{width}} {row['params'] / 1e6:>10.2f}M {row['val_loss']:>9.4f} "
            f"{row['val_vs_peer']:>7.4f} {row['tokens_per_s']:>8,.0f} {row['throughput_vs_peer']:>7.3f}")
