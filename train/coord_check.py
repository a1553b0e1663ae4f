"""`plait mup coord-check`: activation size against width, under muP and the standard parametrization.

The check `mup`'s own tests use (Tensor Programs V, section 5.1): train models of growing
width a few steps on the same batches and record, per layer and step, the mean absolute
value of the layer's output. Under muP every hidden layer's curve is flat in width: width
4w within a factor 1.2 of width w at steps 1 to 3 (step 1 is the forward at
initialization, so the logits, scaled by 1/width_mult, shrink there unless the readout
starts at zero). Under the standard parametrization some layer grows with width once it
has been updated. Prints a table, writes a PNG (one panel per step, muP and standard side
by side) and optionally JSON.

With `--experts E` each block's MLP is a mixture of E experts (top 2): the check then
records each router's logits, a readout like the head's (they may shrink at init, never
grow), and the mixture's output, a hidden layer.

    plait mup coord-check --widths 64 128 256 512 1024 --steps 3 --png docs/mup_coord_check.png
"""

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from plait.data.corpus import prepare_corpus
from plait.optim.builder import build_optimizer
from plait.optim.config import OptimConfig
from plait.optim.schedule import apply_lr
from plait.train.config import ModelConfig
from plait.train.build import build_model
from plait.train.model import Transformer
from plait.train.parametrization import build_parametrization, zero_queries

Coords = Dict[int, Dict[str, List[float]]]  # width -> layer -> mean |output| per step


class TokenBatches:
    """`batches(step)` -> [batch, seq_len + 1] random windows of a uint16 token file, from (seed, step)."""

    def __init__(self, path: str, seq_len: int, batch: int, seed: int):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.seq_len, self.batch, self.seed = seq_len, batch, seed

    def __call__(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch,), generator=generator)
        rows = [self.tokens[s:s + self.seq_len + 1].astype(np.int64) for s in starts.tolist()]
        return torch.from_numpy(np.stack(rows))


def watched_modules(model: Transformer) -> Dict[str, torch.nn.Module]:
    """The layers whose outputs are recorded, by a short name (the logits are the model's output; a mixture of
    experts' router logits are `i.router`, its output `i.moe`)."""
    watched = {"embedding": model.embed}
    for index, block in model.layers.items():
        query = getattr(block.attn, "wqkv", None) or block.attn.wq or block.attn.wq_b  # (latent attention: q alone)
        watched.update({f"{index}.qkv": query, f"{index}.attn_out": block.attn.wo})
        if hasattr(block.mlp, "router"):
            watched.update({f"{index}.router": block.mlp.router, f"{index}.moe": block.mlp})
        else:
            watched.update({f"{index}.mlp_in": block.mlp.w13, f"{index}.mlp_out": block.mlp.w2})
        watched[f"{index}.block"] = block
    watched["final_norm"] = model.norm
    return watched


def is_readout(name: str) -> bool:
    """The coordinates muP lets shrink at init (scaled by 1/width_mult): the logits and the routers' logits."""
    return name == "logits" or name.endswith(".router")


def coord_data(widths: Sequence[int], mup: bool, tokens: str, *, steps: int = 3, seeds: int = 2,
               optim: str = "lion", lr: float = 2e-3, base_dim: int = 64, n_heads: int = 4,
               n_layers: int = 2, seq_len: int = 32, batch: int = 8, zero_readout: bool = False,
               experts: int = 0, attention: str = "mha") -> Coords:
    """Mean |activation| per layer and step (1 = at init), averaged over seeds, for each width (with `experts`,
    each MLP a mixture of that many experts, top 2; `attention`: mha, or mla, DeepSeek's latent attention, its
    sizes the defaults of the head size)."""
    train_path = tokens
    out: Coords = {}
    for width in widths:
        totals: Dict[str, List[float]] = {}
        for seed in range(seeds):
            model_cfg = ModelConfig(dim=width, n_layers=n_layers, n_heads=n_heads, base_dim=base_dim,
                                    max_seq_len=seq_len, moe_experts=experts, moe_top_k=min(2, experts) or 1,
                                    attention=attention)
            optim_cfg = OptimConfig(name=optim, lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                                    betas=[0.9, 0.99] if optim == "lion" else [0.9, 0.95], grad_clip=0.0,
                                    impl="foreach", mup=mup, mup_zero_readout=zero_readout)
            found = record(model_cfg, optim_cfg, train_path, seed, steps, seq_len, batch)
            for name, values in found.items():
                sums = totals.setdefault(name, [0.0] * steps)
                for step, value in enumerate(values):
                    sums[step] += value / seeds
        out[width] = totals
    return out


def record(model_cfg: ModelConfig, optim_cfg: OptimConfig, train_path: str, seed: int, steps: int,
           seq_len: int, batch: int) -> Dict[str, List[float]]:
    """Train `steps` steps of one model; each step's forward records every watched output."""
    param = build_parametrization(model_cfg, optim_cfg)
    torch.manual_seed(seed)
    model = build_model(model_cfg, seed=seed, scales=param.scales, std_of=param.std_of)
    if param.zero_query:
        zero_queries(model)
    optimizer = build_optimizer(dict(model.named_parameters()), optim_cfg, param.group_of)
    batches = TokenBatches(train_path, seq_len, batch, seed)
    found: Dict[str, List[float]] = {}

    def mean_abs(output) -> float:
        """Mean |x| over the output's elements (over every segment's, for a fused layer run segmented)."""
        parts = output if isinstance(output, tuple) else (output,)
        return float(sum(part.detach().abs().sum() for part in parts) / sum(part.numel() for part in parts))

    def hook(name):
        return lambda module, inputs, output: found.setdefault(name, []).append(mean_abs(output))

    handles = [module.register_forward_hook(hook(name)) for name, module in watched_modules(model).items()]
    try:
        for step in range(steps):
            apply_lr(optimizer, step, steps, optim_cfg)
            tokens = batches(step)
            logits = model(tokens[:, :-1])
            found.setdefault("logits", []).append(float(logits.detach().abs().mean()))
            model.loss(logits, tokens[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    return found


def growth(coords: Coords, factor: int = 4) -> Dict[str, Tuple[float, float]]:
    """Per layer, the (smallest, largest) ratio of width factor*w over width w, over steps and widths."""
    widths = sorted(coords)
    out: Dict[str, Tuple[float, float]] = {}
    for w in widths:
        if factor * w not in coords:
            continue
        for name, values in coords[w].items():
            for step, small in enumerate(values):
                big = coords[factor * w][name][step]
                if small == 0.0 or big == 0.0:  # a zero-initialized readout at step 1
                    continue
                low, high = out.get(name, (float("inf"), 0.0))
                out[name] = (min(low, big / small), max(high, big / small))
    return out


def worst_hidden(coords: Coords, factor: int = 4) -> float:
    """The worst ratio either way (>= 1) over every layer but the readouts: muP passes at <= 1.2."""
    return max(max(high, 1.0 / low) for name, (low, high) in growth(coords, factor).items() if not is_readout(name))


def readout_growth(coords: Coords, factor: int = 4) -> float:
    """The largest ratio of width 4w over w of any readout (the logits, the routers' logits): muP's never grow."""
    return max(high for name, (low, high) in growth(coords, factor).items() if is_readout(name))


def print_table(label: str, coords: Coords) -> None:
    widths = sorted(coords)
    names = list(coords[widths[0]])
    steps = len(coords[widths[0]][names[0]])
    ratios = growth(coords)
    print(f"\n{label}: mean |activation| per layer (rows) and width (columns); "
          "smallest and largest ratio of width 4w over w at right")
    print(f"{'layer':12s} {'step':>4s} " + " ".join(f"{w:>9d}" for w in widths) + f" {'min 4x':>7s} {'max 4x':>7s}")
    for name in names:
        for step in range(steps):
            cells = " ".join(f"{coords[w][name][step]:9.4f}" for w in widths)
            low, high = ratios.get(name, (float("nan"), float("nan")))
            tail = f" {low:7.3f} {high:7.3f}" if step == 0 else ""
            print(f"{name:12s} {step + 1:4d} {cells}{tail}")


def plot(results: Dict[str, Coords], path: str) -> None:
    """One panel per (parametrization, step): mean |activation| against width, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    first = results[labels[0]]
    widths = sorted(first)
    names = list(first[widths[0]])
    steps = len(first[widths[0]][names[0]])
    fig, axes = plt.subplots(len(labels), steps, figsize=(4 * steps, 3.4 * len(labels)), squeeze=False,
                             sharey="row")
    for row, label in enumerate(labels):
        coords = results[label]
        for step in range(steps):
            ax = axes[row][step]
            for name in names:
                ax.plot(widths, [coords[w][name][step] for w in widths], marker="o", ms=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{label}, step {step + 1}")
            ax.set_xlabel("width")
            if step == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plait mup coord-check", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--base-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--optim", choices=["lion", "adamw"], default="lion")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--zero-readout", action="store_true")
    parser.add_argument("--experts", type=int, default=0, help="each MLP a mixture of this many experts (top 2)")
    parser.add_argument("--attention", choices=["mha", "mla"], default="mha",
                        help="mla: DeepSeek's multi-head latent attention in every block")
    parser.add_argument("--data", default=None, help="text to train on (default: the standard library)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--png", default="mup_coord_check.png")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_path, _ = prepare_corpus(args.data, args.cache_dir, 0.02)
    settings = dict(steps=args.steps, seeds=args.seeds, optim=args.optim, lr=args.lr, base_dim=args.base_dim,
                    zero_readout=args.zero_readout, experts=args.experts, attention=args.attention)
    results = {"muP": coord_data(args.widths, True, str(train_path), **settings),
               "standard": coord_data(args.widths, False, str(train_path), **settings)}
    for label, coords in results.items():
        print_table(label, coords)
    summary = {label: worst_hidden(coords) for label, coords in results.items()}
    summary.update({f"{label}_logits_growth": readout_growth(coords) for label, coords in results.items()})
    print(f"\nworst 4x-width ratio over hidden layers and steps: muP {summary['muP']:.3f}, "
          f"standard {summary['standard']:.3f} (muP passes at <= 1.2); largest readout growth (logits"
          f"{', routers' if args.experts else ''}): muP {summary['muP_logits_growth']:.3f}, "
          f"standard {summary['standard_logits_growth']:.3f}")
    plot(results, args.png)
    print(f"wrote {args.png}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": dict(settings, widths=args.widths), "coords": results, "summary": summary}, f)
        os.replace(tmp, args.out)
    return 0
