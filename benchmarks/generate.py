"""Decoding speed: `plait generate`'s KV cache against Hugging Face's `LlamaForCausalLM.generate` on the same
weights (exported with `plait export`'s mapping), and against plait without a cache (the whole sequence
through the model for every token).

Greedy decoding, the same prompt, `--new` tokens each (no end-of-text stop). Round by round, the contenders
run in turn on the same thread count; medians with min and max. The tokens plait and transformers draw are
compared: the benchmark says whether they agree (they should: the same model, fp32).

    python benchmarks/generate.py --out generate.json
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402

CONTENDERS = ("plait-kv-cache", "plait-no-cache", "transformers-generate")


def _plait_model(args, device):
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      vocab_size=args.vocab, max_seq_len=args.prompt + args.new)
    return cfg, build_model(cfg, seed=0, device=device).eval()


def _hf_model(cfg, model, device):
    """transformers' Llama holding `model`'s weights, through the export mapping (written and read back)."""
    import transformers

    from plait.parallel.plans import param_specs
    from plait.train.checkpoint import model_meta
    from plait.train.export import HF_CONFIG, HF_WEIGHTS, hf_config, to_hf
    from plait.train.tensorfile import write_atomic, write_safetensors

    specs = param_specs(model)
    full = {name: (p.detach()[:specs[name].valid_rows] if specs[name].valid_rows else p.detach()).cpu()
            for name, p in model.named_parameters()}
    meta = model_meta(cfg)["model"]
    with tempfile.TemporaryDirectory() as directory:
        write_safetensors(Path(directory) / HF_WEIGHTS, to_hf(meta, full, None))
        write_atomic(Path(directory) / HF_CONFIG, __import__("json").dumps(hf_config(meta)).encode())
        hf = transformers.LlamaForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    return hf.to(device).eval()


def _contenders(args, device):
    from plait.train.decode import generate

    cfg, model = _plait_model(args, device)
    hf = _hf_model(cfg, model, device)
    vocab = cfg.vocab_size

    @torch.no_grad()
    def no_cache(ids):
        for _ in range(args.new):
            ids = torch.cat((ids, model(ids)[:, -1, :vocab].argmax(-1, keepdim=True)), dim=1)
        return ids

    @torch.no_grad()
    def transformers_generate(ids):
        return hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, use_cache=True,
                           pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))

    return {"plait-kv-cache": lambda ids: generate(model, ids, args.new, temperature=0),
            "plait-no-cache": no_cache, "transformers-generate": transformers_generate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=192, help="tokens drawn")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    contenders = _contenders(args, device)
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    outputs = {name: run(ids) for name, run in contenders.items()}  # warm-up, and the tokens to compare
    seconds = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    tokens = args.new * args.batch
    peer = statistics.median(seconds["transformers-generate"])
    rows = []
    print(f"{'contender':<24} {'tokens/s':>9} {'ms (min-max)':>20} {'x transformers':>15}")
    for name in CONTENDERS:
        median = statistics.median(seconds[name])
        spread = {"median": median, "min": min(seconds[name]), "max": max(seconds[name])}
        rows.append({"contender": name, "tokens_per_s": tokens / median, "seconds": spread,
                     "time_vs_transformers": median / peer})
        print(f"{name:<24} {tokens / median:>9.0f} {1e3 * median:>8.0f} ({1e3 * min(seconds[name]):.0f}-"
              f"{1e3 * max(seconds[name]):.0f}) {median / peer:>15.3f}")
    same = {name: bool(torch.equal(outputs[name].cpu(), outputs["transformers-generate"].cpu()))
            for name in ("plait-kv-cache", "plait-no-cache")}
    print(f"greedy tokens equal to transformers': {same}")
    summary = {"plait_time_vs_transformers": rows[0]["time_vs_transformers"],
               "cache_speedup": rows[1]["seconds"]["median"] / rows[0]["seconds"]["median"],
               "plait_tokens_per_s": rows[0]["tokens_per_s"], "same_tokens_as_transformers": same["plait-kv-cache"]}
    if args.out:
        write_json(args.out, {"benchmark": "generate", "device": str(device), "settings": vars(args), "rows": rows,
                              "summary": summary})


if __name__ == "__main__":
    main()
