"""Train a tiny model with plait, export it to Hugging Face, generate text with transformers.

1. `plait.train.Trainer` trains a small byte-level LLaMA on the standard library's source
   and writes a checkpoint (safetensors shards plus an index of the layout).
2. `plait.train.export_checkpoint` writes one Hugging Face Llama directory: config.json and
   model.safetensors (the same as `plait export <checkpoint> <out>`), with muP multipliers
   folded into the weights.
3. `transformers.LlamaForCausalLM.from_pretrained(out).generate(...)` continues a prompt,
   offline; the tokens are bytes, so decoding is `bytes(ids)`. The same greedy decoding is
   run with plait's own model for comparison.

    python examples/hf_generate.py --steps 60 --new-tokens 40 --out /tmp/hf-example
"""

import argparse
import json
from pathlib import Path

import torch

from plait.train import Trainer, export_checkpoint, load_config


@torch.no_grad()
def plait_greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with plait's model (full forward per token: small models only)."""
    for _ in range(new_tokens):
        logits = model(ids)[:, -1, :256]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--prompt", default="def main(")
    parser.add_argument("--out", default="hf-example")
    args = parser.parse_args()
    out = Path(args.out)

    cfg = load_config(["model=tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "train.seq_len=64",
                       "train.batch_size=8", f"train.steps={args.steps}", "train.eval_every=0", "train.log_every=20",
                       "train.progress=false", "train.peak_flops=1e10", "optim.lr=3e-3", "optim.warmup_steps=5",
                       f"train.run_dir={out / 'run'}", "train.device=cpu"])
    trainer = Trainer(cfg)
    trainer.fit()  # writes the final checkpoint (checkpoint.save_final=true)
    checkpoint = trainer.checkpoint_dir / (trainer.checkpoint_dir / "latest").read_text().strip()
    hf_dir = export_checkpoint(checkpoint, out / "hf")
    print(f"exported {checkpoint} -> {hf_dir}: {sorted(p.name for p in hf_dir.iterdir())}")

    from transformers import LlamaForCausalLM  # offline: everything is read from hf_dir

    hf_model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    prompt = torch.tensor([list(args.prompt.encode())])
    generated = hf_model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=0)
    ours = plait_greedy(trainer.model.eval(), prompt, args.new_tokens)
    text = bytes(generated[0].tolist()).decode("utf-8", errors="replace")
    print(f"generated {generated.shape[1] - prompt.shape[1]} new tokens: {text!r}")
    result = {"prompt_tokens": prompt.shape[1], "total_tokens": generated.shape[1], "text": text,
              "same_as_plait_greedy": bool(torch.equal(generated, ours)), "hf_dir": str(hf_dir)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    trainer.close()


if __name__ == "__main__":
    main()
