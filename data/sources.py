"""The `data` config -> train and validation datasets (and blends of several), opened on the device.

`data.path` (or each entry of `data.paths`, blended by `data.weights`) may be:

- empty: the Python standard library's source, byte-level (prepared once into the cache);
- a directory made by `plait data prepare` (it holds `meta.json`, `train.idx`, `val.idx`);
- a Megatron-style shard, `prefix`, `prefix.bin` or `prefix.idx`, or a directory of such
  shards: their last `data.val_fraction` of tokens is held out for validation;
- text: a file, a directory of text files or a `.jsonl`, prepared into the cache with
  `data.tokenizer` (byte, bpe, or a tokenizer.json), by the code behind `plait data prepare`.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from plait.data.config import DataConfig
from plait.data.corpus import cache_root, prepare_text
from plait.data.dataset import OpenShard, TokenDataset, TokenSpan, train_tokens
from plait.data.errors import DataError
from plait.data.shards import TokenShard, check_vocab_fits, prefix_of

log = logging.getLogger("plait")


@dataclass
class Source:
    """One corpus, opened: its train and validation datasets, its vocabulary and its tokenizer ("byte", the
    path of the prepared directory's tokenizer.json, or None: unknown, as for Megatron shards)."""

    name: str
    train: TokenDataset
    val: Optional[TokenDataset]
    vocab_size: Optional[int]
    shards: List[OpenShard]
    tokenizer: Optional[str] = None
    eos: Optional[int] = None  # the end-of-document token its preparation recorded (None: unknown)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def _shard_prefixes(path: Path) -> Optional[List[Path]]:
    """Megatron-style shard prefixes at `path` (a prefix, a .bin/.idx, or a directory of them), else None."""
    if Path(f"{prefix_of(path)}.idx").exists():
        return [prefix_of(path)]
    if path.is_dir():
        found = sorted(p.with_suffix("") for p in path.glob("*.idx"))
        return found or None
    return None


def _read_meta(directory: Path) -> dict:
    file = directory / "meta.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{file} cannot be read ({error}); prepare the directory again.") from None


def _check_meta(meta: dict, shard: TokenShard, file: Path) -> None:
    if meta.get("dtype") and meta["dtype"] != shard.dtype.name:
        raise DataError(f"{shard.idx_path} holds {shard.dtype.name} tokens but {file} says {meta['dtype']}; "
                        f"the shards and their metadata disagree, prepare the directory again.")
    check_vocab_fits(int(meta.get("vocab_size", 0)), shard.dtype, shard.bin_path)


def open_source(path: Optional[str], cfg: DataConfig, seq_len: int, device: torch.device) -> Source:
    """Open (preparing text first, if needed) one corpus."""
    if not path:
        directory = prepare_text(None, cfg.cache_dir, cfg.val_fraction, cfg.tokenizer, cfg.vocab_size, cfg.workers)
        return _open_prepared(directory, seq_len, device, "the standard library")
    location = Path(path).expanduser()
    if (location / "meta.json").exists():
        return _open_prepared(location, seq_len, device, str(location))
    prefixes = _shard_prefixes(location)
    if prefixes:
        return _open_shards(prefixes, cfg.val_fraction, seq_len, device, str(location))
    if not location.exists():
        raise DataError(f"data.path={path} does not exist; point it at text, a prepared directory or shards.")
    if location.is_dir() and not any(location.iterdir()):
        raise DataError(f"data.path={path} is an empty directory: it holds no non-empty text files, no Megatron "
                        f".bin/.idx shards and no `plait data prepare` output; point data.path at one of those.")
    directory = prepare_text(path, cfg.cache_dir, cfg.val_fraction, cfg.tokenizer, cfg.vocab_size, cfg.workers)
    return _open_prepared(directory, seq_len, device, str(location))


def _open_prepared(directory: Path, seq_len: int, device: torch.device, name: str) -> Source:
    meta = _read_meta(directory)
    shards = [TokenShard(directory / "train")]
    if meta.get("val_tokens", 1) > 0:  # prepared with val_fraction=0: no validation file to open
        shards.append(TokenShard(directory / "val"))
    for shard in shards:
        _check_meta(meta, shard, directory / "meta.json")
    opened = [OpenShard(shard, device) for shard in shards]
    train_set = TokenDataset([TokenSpan(opened[0], 0, len(shards[0]))], seq_len, f"{name} (train)")
    val_set = _maybe_dataset([TokenSpan(opened[1], 0, len(shards[1]))], seq_len, f"{name} (validation)") \
        if len(opened) > 1 else None
    eos = int(meta["eos"]) if meta.get("eos") is not None else None
    return Source(name, train_set, val_set, int(meta["vocab_size"]), opened, _tokenizer_of(directory, meta), eos)


def _tokenizer_of(directory: Path, meta: dict) -> Optional[str]:
    """What tokenized a prepared directory: "byte", or its own tokenizer.json (absolute), else None."""
    if meta.get("tokenizer") == "byte":
        return "byte"
    file = directory / "tokenizer.json"
    return str(file.resolve()) if file.is_file() else None


def _open_shards(prefixes: List[Path], val_fraction: float, seq_len: int, device: torch.device, name: str) -> Source:
    opened = [OpenShard(TokenShard(p), device) for p in prefixes]
    cuts = [train_tokens(o.shard, val_fraction) for o in opened]
    train_set = TokenDataset([TokenSpan(o, 0, c) for o, c in zip(opened, cuts)], seq_len, f"{name} (train)")
    val_set = _maybe_dataset([TokenSpan(o, c, len(o.shard)) for o, c in zip(opened, cuts)], seq_len,
                             f"{name} (validation)")
    return Source(name, train_set, val_set, None, opened)


def _maybe_dataset(spans, seq_len: int, name: str) -> Optional[TokenDataset]:
    """The validation set, or None (with a log line) when it is shorter than one window."""
    try:
        return TokenDataset(spans, seq_len, name)
    except DataError as error:
        log.warning("data: no validation: %s", error)
        return None


def check_token_ids(shard: TokenShard, model_vocab: int, cache: Path) -> None:
    """Every token id of the shard must be a row of the embedding (any format, any tp: padding rows are no
    vocabulary); checked at open time from the shard's largest id (one pass, cached)."""
    largest = shard.max_token(cache)
    if largest >= model_vocab:
        raise DataError(f"{shard.bin_path} holds token id {largest} but model.vocab_size={model_vocab}; set "
                        f"model.vocab_size to at least {largest + 1} (or tokenize with the model's vocabulary).")


def open_sources(cfg: DataConfig, seq_len: int, device: torch.device,
                 model_vocab: Optional[int] = None) -> Tuple[List[Source], List[float]]:
    """Every corpus the config names (`paths` + `weights`, else `path`), checked against the model's vocabulary."""
    paths = list(cfg.paths) if cfg.paths else [cfg.path]
    weights = list(cfg.weights) if cfg.weights else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise DataError(f"data.weights has {len(weights)} entries but data.paths has {len(paths)}; give one weight per path.")
    sources = [open_source(p, cfg, seq_len, device) for p in paths]
    if model_vocab is not None:
        cache = cache_root(cfg.cache_dir) / "shard-max-token.json"
        for source in sources:
            for opened in source.shards:
                check_token_ids(opened.shard, model_vocab, cache)
    for source in sources:
        if model_vocab is not None and source.vocab_size is not None and source.vocab_size != model_vocab:
            if source.vocab_size > model_vocab:
                raise DataError(f"{source.name} has a vocabulary of {source.vocab_size} tokens but model.vocab_size="
                                f"{model_vocab}; set model.vocab_size={source.vocab_size}.")
            log.warning("data: %s uses %d of model.vocab_size=%d token ids", source.name, source.vocab_size, model_vocab)
    return sources, weights
