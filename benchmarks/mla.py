"""Multi-head latent attention (`model.attention=mla`) against its peers: Hugging Face's DeepSeek-V3 attention and
multi-head attention.

1. The step: forward + backward of one dense decoder (dim 256, 4 layers, 8 heads, seq 256, batch 8, fp32) with
   plait's MLA, with Hugging Face's `DeepseekV3ForCausalLM` holding the same weights (the peer: the reference
   implementation of the same model; its SDPA path), and with plait's multi-head attention at the same width.
   Median of `--repeats` after two warm-ups, the losses checked equal.
2. Decoding: greedy, one row, `--new` tokens after a 64-token prompt (max_seq_len 1024), plait's MLA (attending
   over cached latents) against Hugging Face's `generate` on the same weights (the peer; it caches the latents too
   and expands them to every head's keys and values each step) and plait's multi-head attention: seconds, the same
   tokens, and the cache's bytes measured at the end.
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
from in_turn import plot_validation, train_in_turn, training_line, training_rows  # noqa: E402
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


def cache_bytes(caches) -> int:
    """Bytes a list of plait caches holds (latent attention's keys, its values too, counted once)."""
    return sum(c.keys.nbytes + (0 if c.values is c.keys else c.values.nbytes) for c in caches)


def hf_cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def compare_decoding(new: int, repeats: int) -> list:
    from plait.train.build import build_model
    from plait.train.config import ModelConfig
    from plait.train.decode import caches_in, generate

    sizes = {**SIZES, "max_seq_len": 1024}
    mla_cfg, mha_cfg = ModelConfig(**sizes, attention="mla"), ModelConfig(**sizes)
    mla, mha = build_model(mla_cfg, seed=1).eval(), build_model(mha_cfg, seed=1).eval()
    hf = hugging_face_twin(mla, mla_cfg).eval()
    prompt = torch.randint(0, SIZES["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(2))

    def hf_generate():
        return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                           eos_token_id=None, attention_mask=torch.ones_like(prompt))

    runs = {"plait mla": lambda: generate(mla, prompt, new, temperature=0), "hugging face deepseek-v3": hf_generate,
            "plait mha": lambda: generate(mha, prompt, new, temperature=0)}
    rows, texts = [], {}
    with torch.no_grad():
        for name, run in runs.items():
            texts[name] = run()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            rows.append({"run": name, "seconds": statistics.median(times)})
        whole = texts["plait mla"]
        for model, row in ((mla, rows[0]), (mha, rows[2])):
            with caches_in(model.layers.values(), None) as caches:
                model(whole)
            row["cache_bytes"] = cache_bytes(caches)
        out = hf(whole, use_cache=True)
        rows[1]["cache_bytes"] = hf_cache_bytes(getattr(out, "cache", None) or out.past_key_values)
    assert torch.equal(texts["plait mla"], texts["hugging face deepseek-v3"]), "greedy texts differ"
    peer = rows[1]["seconds"]
    print(f"\n{'decoding ' + str(new) + ' tokens':>26} {'seconds':>9} {'x peer':>7} {'tok/s':>7} {'cache KiB':>10}")
    for row in rows:
        row["vs_peer"], row["tokens_per_s"] = row["seconds"] / peer, new / row["seconds"]
        print(f"{row['run']:>26} {row['seconds']:>9.3f} {row['vs_peer']:>7.3f} {row['tokens_per_s']:>7.1f} "
              f"{row['cache_bytes'] / 1024:>10.0f}")
    print("(plait mla's greedy tokens equal Hugging Face's)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new", type=int, default=512, help="tokens each decoding run draws")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run-root", default="outputs/bench-mla")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = compare_steps(args.repeats)
    decoding = compare_decoding(args.new, 3)
    curves = train_in_turn(VARIANTS, args.steps, args.eval_every, Path(args.run_root))
    print(f"\n{'training':>14} {'parameters':>11} {'val_loss':>9} {'x peer':>7} {'tok/s':>8} {'x peer':>7}")
    rows = training_rows(curves, "mha")
    for row in rows:
        print(training_line(row, 14))
    if args.plot:
        plot_validation(curves, args.plot, with_params=True)
    if args.out:
        write_json(args.out, {"benchmark": "mla", "device": "cpu", "settings": vars(args), "step": steps,
                              "decoding": decoding, "rows": rows, "training": curves})


if __name__ == "__main__":
    main()
