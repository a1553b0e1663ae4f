"""Text from a trained model: `plait generate CKPT [--prompt TEXT]`, and `generate(model, ids, ...)` for a loop.

A checkpoint of any layout is read whole (`load_full_model`) into one plain `Transformer` on one
device. Decoding keeps each layer's keys and values (`KVCache`): the prompt goes through the
model once, then each new token alone, attending to everything cached. The cache plugs into the
two seams every `Attention` has, so the model code is the training code:

    attn.rope_rows(s)        -> the rotary rows of positions filled .. filled + s (not 0 .. s)
    attn.attend(q, k, v, ..) -> appends k, v to the cache; q attends to all cached keys up to its place

A token is drawn from the last position's logits: greedy at `temperature` 0, else sampled from
softmax(logits / temperature) cut to the `top_k` most likely and to the smallest set whose
probability reaches `top_p` (nucleus sampling), from a seeded generator (the same seed gives
the same text). Generation stops at `max_new_tokens`, at the end-of-document token, or at the
model's `max_seq_len` (its rotary tables end there).
"""

import argparse
import contextlib
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from plait.common.checks import SettingError
from plait.train.config import ModelConfig
from plait.train.model import Scales, Transformer
from plait.train.reshard import CheckpointError, load_full_model, resolve_checkpoint


class KVCache:
    """One attention layer's keys and values so far, [batch, kv heads, filled, head_dim]; with a sliding `window`,
    a query sees only the last `window` places up to its own."""

    def __init__(self, window: Optional[int] = None):
        self.window = window
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    @property
    def filled(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def rope_rows(self, s: int, device) -> slice:
        """The rotary rows of the s new tokens: they follow the cached ones."""
        return slice(self.filled, self.filled + s)

    def drop_last(self, n: int) -> None:
        """Forget the last `n` places (a draft that did not stand: `plait.train.speculative`)."""
        self.keys, self.values = self.keys[:, :, :-n], self.values[:, :, :-n]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keep the new keys and values after the cached ones; all of them."""
        if self.keys is not None:
            k, v = torch.cat((self.keys, k), dim=2), torch.cat((self.values, v), dim=2)
        self.keys, self.values = k, v
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, enable_gqa: bool,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append k, v; new query i (at place filled + i) sees the cached keys and the new ones up to its own.
        (Decoding continues one document: there is no document mask.)"""
        k, v = self.append(k, v)
        s, total = q.shape[2], k.shape[2]
        if s == 1 and self.window is not None:  # one new token: the last `window` keys, its own included
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
        if s == 1 or (s == total and self.window is None):  # every key it has; a first chunk: plain causal
            return F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=scale, enable_gqa=enable_gqa)
        distance = torch.arange(total - s, total, device=q.device)[:, None] - torch.arange(total, device=q.device)
        allowed = (distance >= 0) & (distance < (self.window or total))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa)


class LatentCache(KVCache):
    """Latent attention's cache (train/mla.py, decoding over latents): one key-value head of [latent ; rotated key]
    a token, which is its keys and its values both, kept once."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.keys = k if self.keys is None else torch.cat((self.keys, k), dim=2)
        self.values = self.keys
        return self.keys, self.values

    def drop_last(self, n: int) -> None:
        self.keys = self.values = self.keys[:, :, :-n]


def _attach(blocks: Iterable[nn.Module], window: Optional[int]) -> List[KVCache]:
    """A fresh cache in the attention of each of `blocks` (replacing its seams); latent attention (train/mla.py)
    attends over its cached latents (`absorb`)."""
    caches = []
    for block in blocks:
        latent = hasattr(block.attn, "absorb")
        cache = LatentCache(window) if latent else KVCache(window)
        block.attn.rope_rows, block.attn.attend = cache.rope_rows, cache.attend
        if latent:
            block.attn.absorb = True
        caches.append(cache)
    return caches


def attach_caches(model: Transformer) -> List[KVCache]:
    """Fresh caches in every attention layer of `model` (replacing its attention seams; a decoding model only)."""
    return _attach(model.layers.values(), model.cfg.sliding_window)


@contextlib.contextmanager
def caches_in(blocks: Iterable[nn.Module], window: Optional[int]) -> Iterator[List[KVCache]]:
    """Fresh caches in the attention of each of `blocks` while the `with` body runs; their own seams after."""
    blocks = list(blocks)
    saved = [(block.attn.rope_rows, block.attn.attend, getattr(block.attn, "absorb", None)) for block in blocks]
    try:
        yield _attach(blocks, window)
    finally:
        for block, (rows, attend, absorb) in zip(blocks, saved):
            block.attn.rope_rows, block.attn.attend = rows, attend
            if absorb is not None:
                block.attn.absorb = absorb


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`logits` [..., vocab] with everything outside the `top_k` largest (0: all) and outside the smallest
    most-likely set whose probability reaches `top_p` (1: all) set to -inf. The most likely token is always kept."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row of `logits` [batch, vocab]: argmax at temperature 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`ids` [batch, prompt] followed by up to `max_new_tokens` drawn tokens (fewer at `model.cfg.max_seq_len`,
    or once every row has drawn `eos`; a row that has is padded with `eos`). `model` is a whole plain model,
    in eval mode; its attention seams are replaced by caches for the call and restored after."""
    if ids.shape[1] < 1:
        raise ValueError("generate needs at least one prompt token per row (start a document with the eos id).")
    with caches_in(model.layers.values(), model.cfg.sliding_window):
        new = min(max_new_tokens, model.cfg.max_seq_len - ids.shape[1])
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        step_input, out = ids, [ids]
        for _ in range(max(new, 0)):
            logits = model(step_input)[:, -1, :model.vocab_size]
            token = next_tokens(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                token = token.masked_fill(done, eos)
                done |= token == eos
            out.append(token[:, None])
            step_input = token[:, None]
            if eos is not None and bool(done.all()):
                break
        return torch.cat(out, dim=1)


def tool_device(requested: str) -> torch.device:
    """The tools' `--device`: auto is CUDA where torch sees it, else the CPU; cuda where torch sees none is refused."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise SettingError("--device cuda but torch sees no CUDA device; use --device cpu.")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_model(checkpoint: Path, device: torch.device, dtype: torch.dtype = torch.float32
               ) -> Tuple[Transformer, Dict[str, Any]]:
    """(the whole model of a checkpoint of any layout, in eval mode on `device`, its index); a Hugging Face
    directory (config.json, model.safetensors) is read too, its index made up of its model and its tokenizer.json."""
    if is_hf_directory(Path(checkpoint)):
        return load_hf_model(Path(checkpoint), device, dtype)
    index, full = load_full_model(resolve_checkpoint(checkpoint))
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{key: value for key, value in index["model"].items() if key in known})
    cfg.dropout = 0.0  # decoding draws no dropout masks
    model = Transformer(cfg, scales=Scales(**(index.get("scales") or {})))
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = full[name]
            param.zero_()  # vocabulary padding rows stay zero
            param[:tensor.shape[0]].copy_(tensor)
        for name, buffer in model.named_buffers():  # the experts' routing biases, where the run kept them
            if name in full:
                buffer.copy_(full[name])
    return model.to(device=device, dtype=dtype).eval(), index


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "index.json").exists()


def load_hf_model(directory: Path, device: torch.device, dtype: torch.dtype) -> Tuple[Transformer, Dict[str, Any]]:
    """A Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory as a plait model (refused in one line where plait
    computes something else), and an index with its shape and its tokenizer.json where it has one."""
    import json

    from plait.train.checkpoint import model_meta
    from plait.train.export import HF_CONFIG, init_from_hf, model_config_from_hf

    try:
        cfg = model_config_from_hf(json.loads((directory / HF_CONFIG).read_text()))
    except (KeyError, ValueError) as error:  # a key missing, or not JSON at all
        raise CheckpointError(f"{directory / HF_CONFIG} cannot be read as a model's config ({error!r}); point at a "
                              f"Hugging Face Llama, Mistral or Qwen directory.") from None
    model = Transformer(cfg)
    init_from_hf(model, directory)
    tokenizer = directory / "tokenizer.json"
    index = {**model_meta(cfg), "tokenizer": str(tokenizer) if tokenizer.is_file() else None, "step": None}
    return model.to(device=device, dtype=dtype).eval(), index


def load_tokenizer(spec: Optional[str], index: Dict[str, Any]):
    """`--tokenizer` (byte or a tokenizer.json), else the one the checkpoint's data was made with."""
    from plait.data.errors import DataError
    from plait.data.tokenizer import from_spec

    spec = spec or index.get("tokenizer")
    if spec is None:
        raise CheckpointError("the checkpoint does not record which tokenizer made its data (Megatron shards, saved "
                              "before plait recorded it, or a Hugging Face directory without tokenizer.json); pass "
                              "--tokenizer byte or --tokenizer path/to/tokenizer.json.")
    try:
        tokenizer = from_spec(spec)
    except DataError as error:
        raise CheckpointError(f"--tokenizer {spec}: {error}") from None
    if tokenizer.vocab_size > index["model"]["vocab_size"]:
        raise CheckpointError(f"the tokenizer {spec} has {tokenizer.vocab_size} tokens but the model "
                              f"{index['model']['vocab_size']}; pass the tokenizer the model was trained with.")
    return tokenizer


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plait generate",
                                     description="Continue a prompt with a trained model (any checkpoint layout).")
    parser.add_argument("checkpoint", help="a checkpoint directory, a checkpoint root, a run directory or a Hugging "
                                           "Face Llama / Mistral / Qwen2 / Qwen3 directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: the start of a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus: the most likely tokens up to this mass")
    parser.add_argument("--samples", type=int, default=1, help="independent continuations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="byte or a tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--speculative", action="store_true",
                        help="greedy only: draft each token after next with the model's multi-token prediction depth "
                             "and check it in the same forward as the next (model.mtp_layers > 0)")
    return parser.parse_args(argv)


def _check(args: argparse.Namespace) -> Optional[str]:
    """The first bad argument as one sentence, else None."""
    if args.max_new_tokens < 1:
        return f"--max-new-tokens {args.max_new_tokens} must be at least 1."
    if args.temperature < 0:
        return f"--temperature {args.temperature} is negative; use 0 for greedy decoding or a positive number."
    if args.top_k < 0:
        return f"--top-k {args.top_k} is negative; use 0 for no cut or a positive count."
    if not 0 < args.top_p <= 1:
        return f"--top-p {args.top_p} is outside (0, 1]; use 1 for no cut."
    if args.samples < 1:
        return f"--samples {args.samples} must be at least 1."
    if args.speculative and (args.temperature != 0 or args.samples != 1):
        return (f"--speculative decodes one greedy continuation, but --temperature is {args.temperature} and "
                f"--samples {args.samples}; pass --temperature 0 and --samples 1, or drop --speculative.")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    problem = _check(args)
    if problem:
        print(f"plait generate: error: {problem}", file=sys.stderr)
        return 2
    try:
        device = tool_device(args.device)
        model, index = load_model(Path(args.checkpoint), device, getattr(torch, args.dtype))
        tokenizer = load_tokenizer(args.tokenizer, index)
    except (CheckpointError, SettingError) as error:
        print(f"plait generate: error: {error}", file=sys.stderr)
        return 2
    prompt = [int(i) for i in tokenizer.encode(args.prompt)] if args.prompt else [tokenizer.eos]
    if args.speculative and model.mtp is None:
        print("plait generate: error: --speculative drafts with the model's multi-token prediction depths, and this "
              "model has none (model.mtp_layers=0); drop --speculative.", file=sys.stderr)
        return 2
    if len(prompt) >= model.cfg.max_seq_len:
        print(f"plait generate: error: the prompt is {len(prompt)} tokens but the model reads at most "
              f"model.max_seq_len={model.cfg.max_seq_len}; shorten --prompt.", file=sys.stderr)
        return 2
    ids = torch.tensor([prompt] * args.samples, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started = time.perf_counter()
    if args.speculative:
        from plait.train.speculative import generate_with_mtp

        out, stats = generate_with_mtp(model, ids, args.max_new_tokens, eos=tokenizer.eos)
    else:
        out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos=tokenizer.eos, generator=generator)
    seconds = time.perf_counter() - started
    for row in out.tolist():
        drawn = row[len(prompt):]
        drawn = drawn[:drawn.index(tokenizer.eos)] if tokenizer.eos in drawn else drawn
        print(tokenizer.decode((prompt if args.prompt else []) + drawn))  # whole, so no character is cut
        print("-" * 40)
    tokens = (out.shape[1] - len(prompt)) * args.samples
    origin = f"step {index['step']}" if index.get("step") is not None else args.checkpoint
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s) on {device} "
          f"from {origin}", file=sys.stderr)
    if args.speculative:
        print(f"speculative: {stats['accepted']} of {stats['drafted']} drafts stood "
              f"({stats['accepted'] / max(stats['drafted'], 1):.0%}), {stats['tokens_per_forward']:.2f} tokens per "
              f"forward", file=sys.stderr)
    return 0
