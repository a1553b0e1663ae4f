"""plait's training step against Hugging Face transformers' LlamaForCausalLM, same shapes, same optimizer.

Contenders, stepped in turn round by round (so load swings hit them alike):
  plait eager, plait compiled (torch.compile, what `train.compile=true` does), HF eager (sdpa).
One step = forward, loss, backward and a fused AdamW step on one batch. Each precision is a
separate set of rounds: fp32, then bf16 (every contender under CPU autocast, fp32 master
weights: what `train.precision=bf16` does). Reports tokens/s (median, min, max) and each
contender's ratio to the HF peer at the same precision. `fp8` (`--precisions fp8`) runs plait's
linear layers' GEMMs in float8 (`train.precision=fp8`, float8 tensor cores on CUDA) against HF in
bf16, its nearest precision (transformers has no float8 training); MFU there is against the bf16
peak, as the trainer reports it.

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


PRESETS = {"1b": dict(dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, tied=True)}


def model_config(args):
    from plait.train.config import ModelConfig

    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                       ffn_dim=args.ffn, vocab_size=args.vocab, max_seq_len=args.seq, tie_embeddings=args.tied)


def plait_model(args, precision):
    from plait.common.precision import float8_gemms
    from plait.train.build import build_model

    return build_model(model_config(args), seed=0, device=torch.device(args.device), float8=float8_gemms(precision))


def hf_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                      vocab_size=args.vocab, max_position_embeddings=args.seq, tie_word_embeddings=args.tied,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(args.device)


def make_step(loss_fn, params, precision, device_type="cpu"):
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[precision]

    def step(batch):
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = loss_fn(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def builders(args, precision):
    """{name: () -> step}: each contender built on demand (on CUDA one at a time)."""
    device_type = torch.device(args.device).type

    def plait_eager():
        model = plait_model(args, precision)
        return make_step(lambda x, y: model.loss(model(x), y), model.parameters(), precision, device_type)

    def plait_compiled():
        model = plait_model(args, precision)
        loss = torch.compile(lambda x, y: model.loss(model(x), y))
        return make_step(loss, model.parameters(), precision, device_type)

    def hf():
        model = hf_model(args)
        return make_step(lambda x, y: torch.nn.functional.cross_entropy(
            model(input_ids=x).logits.flatten(0, 1).float(), y.flatten()), model.parameters(), precision, device_type)

    return {"plait eager": plait_eager, "plait compiled": plait_compiled, "hf LlamaForCausalLM": hf}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(args, count):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator).to(args.device)
            for _ in range(count)]


def measure(args, precision):
    """Step every contender at one precision; returns ({name: [seconds per step]}, {name: peak bytes}).

    CPU: all built first, stepped round by round. CUDA: one contender at a time, freed after.
    """
    device = torch.device(args.device)
    batches = _batches(args, args.warmup + args.rounds)
    times, peaks = {}, {}
    if device.type != "cuda":
        steps = {name: build() for name, build in builders(args, precision).items()}
        times = {name: [] for name in steps}
        for round_index, batch in enumerate(batches):
            for name, step in steps.items():
                start = time.perf_counter()
                step(batch)
                if round_index >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        return times, peaks
    for name, build in builders(args, precision).items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step = build()
        times[name] = []
        for round_index, batch in enumerate(batches):
            _sync(device)
            start = time.perf_counter()
            step(batch)
            _sync(device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
        peaks[name] = torch.cuda.max_memory_allocated(device)
        del step
    return times, peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model shapes (overrides dim etc.)")
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="comma-separated; bf16 runs every contender under autocast (fp32 master weights); fp8: "
                             "plait's float8 GEMMs against HF in bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="step_throughput.json")
    args = parser.parse_args()
    for key, value in PRESETS.get(args.preset, {}).items():
        setattr(args, key, value)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from plait.train.metrics import flops_per_token
    from plait.train.peaks import device_name, peak_flops

    tokens = args.batch * args.seq
    per_token = flops_per_token(model_config(args), args.seq)
    rows, summary = [], {}
    print(f"{'precision':<9} {'contender':<22} {'tokens/s':>10} {'min':>9} {'max':>9} {'x HF':>7} {'MFU':>6} "
          f"{'peak GiB':>8}")
    for precision in args.precisions.split(","):
        peak, peak_source = peak_flops(device, precision)
        times, memory = measure(args, precision)
        peer = statistics.median(times["hf LlamaForCausalLM"])
        for name, values in times.items():
            median = statistics.median(values)
            row = {"precision": precision, "contender": name, "tokens_per_s": tokens / median,
                   "tokens_per_s_min": tokens / max(values), "tokens_per_s_max": tokens / min(values),
                   "vs_hf": peer / median, "mfu": tokens / median * per_token / peak,
                   "peak_memory_bytes": memory.get(name)}
            rows.append(row)
            print(f"{precision:<9} {name:<22} {row['tokens_per_s']:>10,.0f} {row['tokens_per_s_min']:>9,.0f} "
                  f"{row['tokens_per_s_max']:>9,.0f} {row['vs_hf']:>7.3f} {100 * row['mfu']:>5.1f}% "
                  f"{(row['peak_memory_bytes'] or 0) / 2**30:>8.1f}")
        summary[precision] = {"eager_vs_hf": peer / statistics.median(times["plait eager"]),
                              "compiled_vs_hf": peer / statistics.median(times["plait compiled"]),
                              "hf_tokens_per_s": tokens / peer, "peak_flops": peak, "peak_source": peak_source}
        print(f"MFU against {peak / 1e12:.1f} TFLOP/s ({peak_source})")
    where = device_name(device) if device.type == "cuda" else f"cpu ({args.threads} thread)"
    with open(args.out, "w") as handle:
        json.dump({"benchmark": "step_throughput", "device": where,
                   "shapes": vars(args), "rows": rows, "summary": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
