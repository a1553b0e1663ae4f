"""Multi-head latent attention (`model.attention=mla`) against its peers: Hugging Face's DeepSeek-V3 attention and
multi-head attention.

1. The step: forward + backward of one dense decoder (dim 256, 4 layers, 8 heads, seq 256, batch 8, fp32) with
   plait's MLA, with Hugging Face's `DeepseekV3ForCausalLM` holding the same weights (the peer: the reference
   implementation of the same model; its SDPA path), and with plait's multi-head attention at the same width.
   Median of `--repeats` after two warm-ups, the losses checked equal.
2. The cache: numbers a token keeps per layer at inference, multi-head attention's keys and values against MLA's
   latent and shared rotary key (what DeepSeek's inference caches) and against what plait's decoding cache holds.
3. Training: the default job (model=tiny, the standard library's text) with multi-head attention (the peer) and with
   MLA at its default sizes and with a query latent, the trainers stepped in turn; validation loss and tokens/s.

    python benchmarks/mla.py --threads 2 --out docs/mla.json --plot docs/img/mla_vs_mha.png
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

SIZES = dict(vocab_size=256, dim=256, n_layers=4, n_heads=8, max_seq_len=256)
VARIANTS = {"mha": [], "mla": ["model.attention=mla"],
            "mla q-latent": ["model.attention=mla", "model.q_lora_rank=96", "model.kv_lora_rank=64"]}


def step_seconds(forward_loss, repeats: int) -> float:
    """Median seconds of forward + backward (the parameters' grads dropped between)."""
    times = []
    for index in range(repeats + 2):
        start = time.perf_counter()
        forward_loss().backward()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def hugging_face_twin(model, cfg):
    """`DeepseekV3ForCausalLM` with `model`'s weights (plait's own export mapping)."""
    import dataclasses

    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from plait.train.config import ffn_dim
    from plait.train.export import hf_config, to_hf

    recorded = {**dataclasses.asdict(cfg), "ffn_dim": ffn_dim(cfg), "n_kv_heads": cfg.n_heads}
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_config(recorded)))
    full = {name: p.detach()[:cfg.vocab_size] if name in ("embed.weight", "head.weight") else p.detach()
            for name, p in model.named_parameters()}
    hf.load_state_dict(to_hf(recorded, full))
    hf.config._attn_implementation = "sdpa"
    return hf


def compare_steps(repeats: int) -> list:
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    tokens = torch.randint(0, SIZES["vocab_size"], (8, SIZES["max_seq_len"] + 1),
                           generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mla_cfg, mha_cfg = ModelConfig(**SIZES, attention="mla"), ModelConfig(**SIZES)
    mla, mha = build_model(mla_cfg, seed=1), build_model(mha_cfg, seed=1)
    hf = hugging_face_twin(mla, mla_cfg)
    runs = {"plait mla": lambda: mla.loss(mla(inputs), targets),
            "hugging face deepseek-v3": lambda: torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1),
                                                                                 targets.flatten()),
            "plait mha": lambda: mha.loss(mha(inputs), targets)}
    plait_loss, hf_loss = runs["plait mla"]().item(), runs["hugging face deepseek-v3"]().item()
    assert abs(plait_loss - hf_loss) < 1e-4 * abs(hf_loss), (plait_loss, hf_loss)
    rows = []
    for name, run in runs.items():
        seconds = step_seconds(run, repeats)
        rows.append({"run": name, "step_s": seconds})
    peer = rows[1]["step_s"]
    print(f"{'forward + backward':>26} {'seconds':>9} {'x peer':>7}")
    for row in rows:
        row["vs_peer"] = row["step_s"] / peer
        print(f"{row['run']:>26} {row['step_s']:>9.4f} {row['vs_peer']:>7.3f}")
    print(f"(losses: plait {plait_loss:.6f}, hugging face {hf_loss:.6f})")
    return rows


def cache_numbers() -> dict:
    """Numbers one token keeps per layer at inference."""
    from plait.train.config import ModelConfig, latent_dims

    dims = latent_dims(ModelConfig(**SIZES, attention="mla"))
    heads, head = SIZES["n_heads"], SIZES["dim"] // SIZES["n_heads"]
    numbers = {"mha keys and values": 2 * heads * head, "mla latent + rotary key (DeepSeek's cache)":
               dims.kv_rank + dims.rope, "mla as plait's cache holds it (each head's k and padded v)":
               heads * dims.qk + heads * max(dims.qk, dims.v)}
    print(f"\n{'cache per token and layer':>58} {'numbers':>8}")
    for name, count in numbers.items():
        print(f"{name:>58} {count:>8}")
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run-root", default="outputs/bench-mla")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = compare_steps(args.repeats)
    cache = cache_numbers()
    curves = train_in_turn(VARIANTS, args.steps, args.eval_every, Path(args.run_root))
    peer = curves["mha"]
    peer_rate = statistics.median(peer["tokens_per_s"])
    print(f"\n{'training':>14} {'parameters':>11} {'val_loss':>9} {'x peer':>7} {'tok/s':>8} {'x peer':>7}")
    rows = []
    for name, curve in curves.items():
        val, rate = curve["val"][-1][1], statistics.median(curve["tokens_per_s"])
        row = {"variant": name, "params": curve["params"], "val_loss": val, "val_vs_peer": val / peer["val"][-1][1],
               "tokens_per_s": rate, "throughput_vs_peer": rate / peer_rate}
        rows.append(row)
        print(f"{name:>14} {curve['params'] / 1e6:>10.2f}M {val:>9.4f} {row['val_vs_peer']:>7.4f} {rate:>8,.0f} "
              f"{row['throughput_vs_peer']:>7.3f}")
    if args.plot:
        plot_validation(curves, args.plot, with_params=True)
    if args.out:
        write_json(args.out, {"benchmark": "mla", "device": "cpu", "settings": vars(args), "step": steps,
                              "cache": cache, "rows": rows, "training": curves})


if __name__ == "__main__":
    main()
