"""plait's training step against Hugging Face transformers' LlamaForCausalLM, same shapes, same optimizer.

Contenders, stepped in turn round by round (so load swings hit them alike):
  plait eager, plait compiled (torch.compile, what `train.compile=true` does), HF eager (sdpa).
One step = forward, loss, backward and a fused AdamW step on one batch. Each precision is a
separate set of rounds: fp32, then bf16 (every contender under CPU autocast, fp32 master
weights: what `train.precision=bf16` does). Reports tokens/s (median, min, max) and each
contender's ratio to the HF peer at the same precision.

In fp32 on one CPU core the step is bounded by two kernels every contender shares: the GEMMs
(MKL sgemm, about 92 GFLOP/s here, about 70% of the HF step) and the flash-attention kernel
(about 19%), so no fusion of the rest can pass about 1.11 x the peer. bf16 halves the GEMM
time; there plait also attends in fp32 (faster than torch's bf16 CPU attention kernel).

    python benchmarks/step_throughput.py --out step_throughput.json
"""

import argparse
import json
import os
import statistics
import time

import torch


def plait_model(args):
    from plait.train.config import ModelConfig
    from plait.train.model import build_model

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn,
                      vocab_size=args.vocab, max_seq_len=args.seq)
    return build_model(cfg, seed=0)


def hf_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=args.seq, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def make_step(loss_fn, params, precision):
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def step(batch):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = loss_fn(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def contenders(args, precision):
    model = plait_model(args)
    compiled_model = plait_model(args)
    compiled_loss = torch.compile(lambda x, y: compiled_model.loss(compiled_model(x), y))
    hf = hf_model(args)
    return {
        "plait eager": make_step(lambda x, y: model.loss(model(x), y), model.parameters(), precision),
        "plait compiled": make_step(compiled_loss, compiled_model.parameters(), precision),
        "hf LlamaForCausalLM": make_step(lambda x, y: torch.nn.functional.cross_entropy(
            hf(input_ids=x).logits.flatten(0, 1).float(), y.flatten()), hf.parameters(), precision),
    }


def measure(args, precision):
    """Step every contender round by round at one precision; returns {name: [seconds per step]}."""
    steps = contenders(args, precision)
    generator = torch.Generator().manual_seed(0)
    times = {name: [] for name in steps}
    for round_index in range(args.warmup + args.rounds):
        batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="comma-separated; bf16 runs every contender under CPU autocast (fp32 master weights)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="step_throughput.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    tokens = args.batch * args.seq
    rows, summary = [], {}
    print(f"{'precision':<9} {'contender':<22} {'tokens/s':>10} {'min':>9} {'max':>9} {'x HF':>7}")
    for precision in args.precisions.split(","):
        times = measure(args, precision)
        peer = statistics.median(times["hf LlamaForCausalLM"])
        for name, values in times.items():
            median = statistics.median(values)
            row = {"precision": precision, "contender": name, "tokens_per_s": tokens / median,
                   "tokens_per_s_min": tokens / max(values), "tokens_per_s_max": tokens / min(values),
                   "vs_hf": peer / median}
            rows.append(row)
            print(f"{precision:<9} {name:<22} {row['tokens_per_s']:>10,.0f} {row['tokens_per_s_min']:>9,.0f} "
                  f"{row['tokens_per_s_max']:>9,.0f} {row['vs_hf']:>7.3f}")
        summary[precision] = {"eager_vs_hf": peer / statistics.median(times["plait eager"]),
                              "compiled_vs_hf": peer / statistics.median(times["plait compiled"]),
                              "hf_tokens_per_s": tokens / peer}
    with open(args.out, "w") as handle:
        json.dump({"benchmark": "step_throughput", "device": f"cpu ({args.threads} thread)",
                   "shapes": vars(args), "rows": rows, "summary": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
