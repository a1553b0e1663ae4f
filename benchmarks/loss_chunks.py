"""The head and loss in slices (`train.loss_chunks`) against whole logits: memory kept for backward and step time.

One model with a large vocabulary (the case the slices are for), fwd + bwd of one micro-batch, round by
round: plait with `loss_chunks` = 0 (whole logits, as transformers' and Megatron's default loss computes
them) and with each of --chunks. "Kept" is the bytes of every tensor autograd saves for backward during
the forward and the loss (a saved-tensor hook counts them); "peak" adds the largest transient of the
backward with slices, the recomputed slice's logits and softmax, 2 x b x s x vocab x 4 bytes / chunks.

    python benchmarks/loss_chunks.py --out loss_chunks.json
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402


def kept_bytes(model, tokens) -> int:
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        model.loss(model(tokens[:, :-1]), tokens[:, 1:])
    return sum(sizes)


def step(model, tokens) -> float:
    start = time.perf_counter()
    model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, vocab_size=args.vocab, max_seq_len=args.seq)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    settings = [0, *args.chunks]
    kept, seconds = {}, {c: [] for c in settings}
    for chunks in settings:
        model.loss_chunks = chunks
        kept[chunks] = kept_bytes(model, tokens)
        step(model, tokens)  # warm-up
    for _ in range(args.rounds):
        for chunks in settings:
            model.loss_chunks = chunks
            model.zero_grad(set_to_none=True)
            seconds[chunks].append(step(model, tokens))
    logits_bytes = args.batch * args.seq * args.vocab * 4
    base = statistics.median(seconds[0])
    rows = []
    print(f"{'loss_chunks':>11} {'kept MiB':>9} {'peak est MiB':>13} {'fwd+bwd ms (min-max)':>22} {'x whole':>8}")
    for chunks in settings:
        median = statistics.median(seconds[chunks])
        peak = kept[chunks] + (2 * logits_bytes / chunks if chunks else 0)  # whole: the logits are among the kept
        rows.append({"loss_chunks": chunks, "kept_bytes": kept[chunks], "peak_estimate_bytes": peak,
                     "seconds": {"median": median, "min": min(seconds[chunks]), "max": max(seconds[chunks])},
                     "time_vs_whole": median / base})
        print(f"{chunks:>11} {kept[chunks] / 2**20:>9.1f} {peak / 2**20:>13.1f} {1e3 * median:>10.0f} "
              f"({1e3 * min(seconds[chunks]):.0f}-{1e3 * max(seconds[chunks]):.0f}) {median / base:>8.3f}")
    summary = {f"kept_vs_whole_{r['loss_chunks']}": r["kept_bytes"] / kept[0] for r in rows[1:]}
    summary.update({f"time_vs_whole_{r['loss_chunks']}": r["time_vs_whole"] for r in rows[1:]})
    if args.out:
        write_json(args.out, {"benchmark": "loss_chunks", "device": "cpu", "settings": vars(args), "rows": rows,
                              "summary": summary})


if __name__ == "__main__":
    main()
