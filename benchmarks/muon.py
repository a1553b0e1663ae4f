"""Muon (`optim=muon`) against its peers: the optimizer step, and what training reaches.

1. Step: plait's Muon (the hidden matrices, fused Q|K|V and gate|up each orthogonalized per segment;
   AdamW for the rest) against torch.optim.Muon over the same matrices as separate tensors plus
   torch's fused AdamW over the rest: the same arithmetic, so the ratio is plait's overhead. Shapes:
   a LLaMA-like stack (`--dim`, `--layers`). Round by round, medians with min and max.
2. Training: the default job (model=tiny, the standard library's text) with optim=adamw and
   optim=muon at the same learning rate and schedule, stepped in turn in one process; validation
   loss every `--eval-every` steps, tokens/s, and a PNG of the two validation curves.

    python benchmarks/muon.py --out muon.json --plot muon.png
    python benchmarks/muon.py --device cuda --dim 2048 --layers 16 --steps 0 --out muon.json   # the step on a GPU
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from in_turn import plot_validation, train_in_turn  # noqa: E402
from report import write_json  # noqa: E402


def stack_shapes(dim: int, layers: int, vocab: int = 32000):
    """(fused matrices with their segments, the rest): a LLaMA-like stack with a GQA of 4 query heads a kv head."""
    kv, ffn = dim // 4, 8 * dim // 3
    fused = [((dim + 2 * kv, dim), (dim, kv, kv)), ((dim, dim), None), ((2 * ffn, dim), (ffn, ffn)),
             ((dim, ffn), None)] * layers
    rest = [(vocab, dim), (vocab, dim)] + [(dim,)] * (2 * layers + 1)
    return fused, rest


def step_contenders(dim: int, layers: int, device: torch.device = torch.device("cpu")):
    """{name: (tensors, optimizer)}: plait's Muon over the fused weights, torch's Muon + AdamW over split ones."""
    from plait.optim.muon import Muon
    from plait.parallel.grid import Grid
    from plait.parallel.matrices import ShardedMatrices
    from plait.parallel.sharding import ShardSpec

    fused, rest = stack_shapes(dim, layers)
    generator = torch.Generator().manual_seed(0)
    fused_tensors = [(torch.randn(shape, generator=generator) * 0.02).to(device) for shape, _ in fused]
    rest_tensors = [(torch.randn(shape, generator=generator) * 0.02).to(device) for shape in rest]
    names = [f"m{i}" for i in range(len(fused))]
    layout = ShardedMatrices({n: ShardSpec(shape, segments=seg) for n, (shape, seg) in zip(names, fused)},
                             Grid.single(device), False)
    ours_m, ours_r = [t.clone() for t in fused_tensors], [t.clone() for t in rest_tensors]
    plait_muon = Muon([{"params": ours_m, "names": names, "muon": True}, {"params": ours_r}], lr=1e-3,
                      matrices=layout)
    split = [part.clone() for t, (_, seg) in zip(fused_tensors, fused) for part in (t.split(seg) if seg else (t,))]
    theirs_r = [t.clone() for t in rest_tensors]
    torch_muon = torch.optim.Muon(split, lr=1e-3, adjust_lr_fn="match_rms_adamw")
    torch_adamw = torch.optim.AdamW(theirs_r, lr=1e-3, fused=True)

    class Both:
        def step(self):
            torch_muon.step()
            torch_adamw.step()

    return {"plait Muon + AdamW": (ours_m + ours_r, plait_muon), "torch Muon + AdamW": (split + theirs_r, Both())}


def time_steps(dim: int, layers: int, rounds: int, device: torch.device):
    table = step_contenders(dim, layers, device)
    for tensors, _ in table.values():
        for tensor in tensors:
            tensor.grad = torch.randn_like(tensor)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = {name: [] for name in table}
    for _ in range(1 + rounds):  # the first round warms up
        for name, (_, optimizer) in table.items():
            sync()
            start = time.perf_counter()
            optimizer.step()
            sync()
            seconds[name].append(time.perf_counter() - start)
    params = sum(t.numel() for t in table["plait Muon + AdamW"][0])
    return {name: values[1:] for name, values in seconds.items()}, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run (0: step timing only)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the step runs (cuda: timed with a synchronize)")
    parser.add_argument("--run-root", default="outputs/bench-muon")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    seconds, params = time_steps(args.dim, args.layers, args.rounds, device)
    base = statistics.median(seconds["torch Muon + AdamW"])
    rows = []
    print(f"optimizer step over {params / 1e6:.1f}M parameters ({args.layers} layers of dim {args.dim}):")
    print(f"{'contender':>20} {'ms (min-max)':>18} {'x torch':>8}")
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append({"contender": name, "seconds": {"median": median, "min": min(values), "max": max(values)},
                     "vs_torch": median / base})
        print(f"{name:>20} {1e3 * median:>8.1f} ({1e3 * min(values):.1f}-{1e3 * max(values):.1f}) "
              f"{median / base:>8.3f}")
    summary = {"step_vs_torch": rows[0]["vs_torch"], "plait_step_ms": 1e3 * rows[0]["seconds"]["median"],
               "torch_step_ms": 1e3 * rows[1]["seconds"]["median"]}
    curves = {}
    if args.steps:
        variants = {name: [f"optim={name}", f"optim.lr={args.lr}"] for name in ("adamw", "muon")}
        curves = train_in_turn(variants, args.steps, args.eval_every, Path(args.run_root))
        print(f"{'optimizer':>9} {'val_loss':>9} {'tok/s median':>13}")
        for name, curve in curves.items():
            print(f"{name:>9} {curve['val'][-1][1]:>9.4f} {statistics.median(curve['tokens_per_s']):>13,.0f}")
        summary.update({"val_loss_adamw": curves["adamw"]["val"][-1][1], "val_loss_muon": curves["muon"]["val"][-1][1],
                        "throughput_muon_vs_adamw": statistics.median(curves["muon"]["tokens_per_s"])
                        / statistics.median(curves["adamw"]["tokens_per_s"])})
        if args.plot:
            plot_validation(curves, args.plot)
    if args.out:
        write_json(args.out, {"benchmark": "muon", "device": args.device, "settings": vars(args), "rows": rows,
                              "training": curves, "summary": summary})


if __name__ == "__main__":
    main()
