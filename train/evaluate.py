"""`plait eval CKPT`: a checkpoint's held-out loss, in one process, from any layout.

The model is read whole (as `plait generate` reads it) and run over validation batches drawn
exactly as the run drew them: the run's own config (in the checkpoint) gives the data, the
sequence length, the global batch, the seed and the attention mask, so with the defaults the
figure is the `val_loss` the run logged at that step (the mean over `train.eval_batches`
batches of each batch's mean loss). `--data PATH` evaluates on another corpus's validation
split instead (prepared as training would prepare it), `--batches N` reads more or fewer,
`--seq-len` and `--batch-size` change the shape. A Hugging Face Llama / Mistral / Qwen directory
records no run: with `--data` its tokenizer.json tokenizes that text, 8 sequences of 1,024 tokens
a batch unless told otherwise.
Prints the loss in nats per token, its perplexity and bits per token (per byte, for byte-level
models); `--json FILE` writes the same figures.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from plait.common.checks import SettingError
from plait.train.decode import is_hf_directory, load_model, tool_device
from plait.train.reshard import CheckpointError, ShardReader, resolve_checkpoint
from plait.train.tensorfile import write_atomic


def run_settings(checkpoint: Path, index: Dict[str, Any], data_path: Optional[str], seq_len: Optional[int],
                 batch_size: Optional[int]) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """(data config, the run's train settings, its model settings) the batches are drawn by: the run's own, as rank 0
    recorded them, with --data, --seq-len, --batch-size over them; for a Hugging Face directory, which records no
    run, --data tokenized by its tokenizer.json, 1,024-token sequences (at most the model's), 8 a batch."""
    from plait.data.config import DataConfig

    if is_hf_directory(checkpoint):
        if data_path is None or index.get("tokenizer") is None:
            lacks = "" if index.get("tokenizer") else ", which it lacks"
            raise CheckpointError(f"{checkpoint} is a Hugging Face directory, which records no run: pass --data PATH "
                                  f"(text it tokenizes with its tokenizer.json{lacks}).")
        config = {"data": {"path": data_path, "tokenizer": index["tokenizer"]}, "model": index["model"],
                  "train": {"eval_batches": 8, "seed": 1234, "batch_size": 8,
                            "seq_len": min(1024, int(index["model"]["max_seq_len"]))}}
    else:
        config = ShardReader(checkpoint).rank_state(0)["config"]
    data = DataConfig(**config["data"])
    if data_path is not None:
        data.path, data.paths, data.weights = data_path, [], []
    train = {**config["train"], **({"seq_len": seq_len} if seq_len else {}),
             **({"batch_size": batch_size} if batch_size else {})}
    return data, train, config["model"]


@torch.no_grad()
def evaluate_checkpoint(checkpoint: Path, batches: Optional[int] = None, data_path: Optional[str] = None,
                        device: torch.device = torch.device("cpu"), seq_len: Optional[int] = None,
                        batch_size: Optional[int] = None) -> Dict[str, Any]:
    """{"loss", "perplexity", "bits_per_token", "batches", "tokens", "step", "data"} of `checkpoint`: a plait checkpoint
    of any layout, or a Hugging Face Llama / Mistral / Qwen directory (with `data_path`)."""
    from plait.data.documents import document_ids
    from plait.data.loader import Loader

    checkpoint = resolve_checkpoint(checkpoint)
    model, index = load_model(checkpoint, device)
    data, train, model_settings = run_settings(checkpoint, index, data_path, seq_len, batch_size)
    if int(train["seq_len"]) > model.cfg.max_seq_len:
        raise CheckpointError(f"--seq-len {train['seq_len']} exceeds the model's max_seq_len={model.cfg.max_seq_len}.")
    count = int(batches or train["eval_batches"])
    loader = Loader.from_config(data, int(train["seq_len"]), int(train["batch_size"]), 1, seed=int(train["seed"]),
                                device=device, model_vocab=int(model_settings["vocab_size"]))
    documents = model_settings.get("attn_mask") == "document"
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
    parser.add_argument("checkpoint", help="a checkpoint directory, a checkpoint root, a run directory, or a Hugging "
                                           "Face Llama / Mistral / Qwen directory (with --data)")
    parser.add_argument("--data", default=None, help="another corpus (text, a prepared directory or shards)")
    parser.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens a sequence (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences a batch (default: the run's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    for flag, value in (("--batches", args.batches), ("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            print(f"plait eval: error: {flag} {value} must be at least 1.", file=sys.stderr)
            return 2
    try:
        result = evaluate_checkpoint(Path(args.checkpoint), args.batches, args.data, tool_device(args.device),
                                     args.seq_len, args.batch_size)
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
