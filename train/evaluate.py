"""`plait eval CKPT`: a checkpoint's held-out loss, in one process, from any layout.

The model is read whole (as `plait generate` reads it) and run over validation batches drawn
exactly as the run drew them: the run's own config (in the checkpoint) gives the data, the
sequence length, the global batch, the seed and the attention mask, so with the defaults the
figure is the `val_loss` the run logged at that step (the mean over `train.eval_batches`
batches of each batch's mean loss). `--data PATH` evaluates on another corpus's validation
split instead (prepared as training would prepare it), `--batches N` reads more or fewer.
Prints the loss in nats per token, its perplexity and bits per token (per byte, for byte-level
models); `--json FILE` writes the same figures.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from plait.common.checks import SettingError
from plait.train.decode import is_hf_directory, load_model, resolve_checkpoint, tool_device
from plait.train.reshard import CheckpointError, ShardReader
from plait.train.tensorfile import write_atomic


@torch.no_grad()
def evaluate_checkpoint(checkpoint: Path, batches: Optional[int] = None, data_path: Optional[str] = None,
                        device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    """{"loss", "perplexity", "bits_per_token", "batches", "tokens", "step", "data"} of `checkpoint`."""
    from plait.data.config import DataConfig
    from plait.data.documents import document_ids
    from plait.data.loader import Loader

    checkpoint = resolve_checkpoint(checkpoint)
    if is_hf_directory(checkpoint):
        raise CheckpointError(f"{checkpoint} is a Hugging Face directory, and plait eval reads plait checkpoints "
                              f"(their run says what data and batches); start a run from it with checkpoint.init_from="
                              f"{checkpoint}, or sample it with plait generate.")
    model, index = load_model(checkpoint, device)
    config = ShardReader(checkpoint).rank_state(0)["config"]  # the run's own settings, as rank 0 recorded them
    data = DataConfig(**config["data"])
    if data_path is not None:
        data.path, data.paths, data.weights = data_path, [], []
    train = config["train"]
    count = int(batches or train["eval_batches"])
    loader = Loader.from_config(data, int(train["seq_len"]), int(train["batch_size"]), 1, seed=int(train["seed"]),
                                device=device, model_vocab=int(config["model"]["vocab_size"]))
    documents = config["model"].get("attn_mask") == "document"
    if documents and loader.eos is None:
        loader.close()
        raise CheckpointError("the run attended inside documents but this data records no end-of-document token; "
                              "evaluate on data prepared by plait.")
    total = 0.0
    try:
        for number in range(count):
            batch = loader.val_batch(number)[0]
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = model(inputs, documents=document_ids(inputs, loader.eos) if documents else None)
            total += float(model.loss(logits, targets)) / count
    finally:
        loader.close()
    return {"loss": total, "perplexity": math.exp(total), "bits_per_token": total / math.log(2), "batches": count,
            "tokens": count * int(train["batch_size"]) * int(train["seq_len"]), "step": index["step"],
            "data": data_path or "the run's validation split", "byte_level": index["model"]["vocab_size"] == 256
            and index.get("tokenizer") == "byte"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plait eval", description="A checkpoint's held-out loss (any layout), "
                                                                   "on the run's validation batches or another corpus.")
    parser.add_argument("checkpoint", help="a checkpoint directory, a checkpoint root or a run directory")
    parser.add_argument("--data", default=None, help="another corpus (text, a prepared directory or shards)")
    parser.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.batches is not None and args.batches < 1:
        print(f"plait eval: error: --batches {args.batches} must be at least 1.", file=sys.stderr)
        return 2
    try:
        result = evaluate_checkpoint(Path(args.checkpoint), args.batches, args.data, tool_device(args.device))
    except (CheckpointError, SettingError) as error:
        print(f"plait eval: error: {error}", file=sys.stderr)
        return 2
    unit = "bits/byte" if result["byte_level"] else "bits/token"
    print(f"val_loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | {unit} "
          f"{result['bits_per_token']:.4f} | step {result['step']} | {result['batches']} batches, "
          f"{result['tokens']:,} tokens of {result['data']}")
    if args.json:
        write_atomic(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
    return 0
