"""`plait data prepare`: text files, directories and JSONL to token shards, in parallel, deterministically.

Every input file is read and tokenized by a worker process; results come back in input
order (so the output is byte-identical for any worker count) and are appended to two
shards, `train` and `val`, in the output directory, beside `meta.json` (vocabulary,
end-of-document id, dtype, counts) and, for BPE, the `tokenizer.json` used. A document
(a text file, or one JSONL record) goes to validation when a hash of its name falls under
`val_fraction`; if that leaves one side empty (a single file), the tail of the token stream
is held out instead. The directory is built under a temporary name and renamed at the end.

    plait data prepare ~/corpus --out ~/shards                       # byte-level
    plait data prepare a.jsonl b.txt --out sh --tokenizer bpe --vocab-size 8192
    plait data prepare ~/corpus --out sh --tokenizer path/to/tokenizer.json
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from plait.data.errors import DataError
from plait.data.shards import ShardWriter, check_vocab_fits, token_dtype
from plait.data.tokenizer import BPETokenizer, from_spec

JSONL_SUFFIXES = (".jsonl", ".ndjson")
FORMAT = "plait-shards-v1"


def _is_text(path: Path) -> bool:
    with open(path, "rb") as handle:
        return b"\x00" not in handle.read(4096)


def collect_files(paths: Sequence[str], setting: str = "data.path") -> List[Path]:
    """Files named, and every non-empty text file under directories named (binary files skipped), sorted."""
    files: List[Path] = []
    for path in paths:
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(f"{setting}={path} does not exist; point it at a text file or a directory of text.")
        candidates = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        files += [f for f in candidates if f.stat().st_size > 0 and _is_text(f)]
    if not files:
        raise DataError(f"{setting}={','.join(map(str, paths))} holds no non-empty text files; give a directory with text in it.")
    return files


def read_documents(path: Path, jsonl_key: str = "text") -> Iterator[str]:
    """A JSONL file yields one document per record (its `jsonl_key` field); any other file is one document."""
    if path.suffix not in JSONL_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[jsonl_key]
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(f"{path}:{number} is not a JSON object with a '{jsonl_key}' string ({error}); "
                                f"fix the line or pass --jsonl-key.") from None


def is_validation(path: Path, record: int, val_fraction: float) -> bool:
    """Deterministic per-document split from a hash of (parent dir, file name, record number)."""
    key = f"{path.parent.name}/{path.name}#{record}".encode()
    return zlib.crc32(key) % 10000 < val_fraction * 10000


def _tokenize_file(job) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Worker: one file -> (train tokens, train doc lengths, val tokens, val doc lengths), EOS after each doc."""
    path, spec, tokenizer_json, val_fraction, jsonl_key = job
    tokenizer = _worker_tokenizer(spec, tokenizer_json)
    parts = {False: [], True: []}
    for record, text in enumerate(read_documents(path, jsonl_key)):
        ids = tokenizer.encode(text)
        doc = np.empty(len(ids) + 1, dtype=np.int64)
        doc[:-1], doc[-1] = ids, tokenizer.eos
        parts[is_validation(path, record, val_fraction)].append(doc)
    out = []
    for side in (False, True):
        docs = parts[side]
        out += [np.concatenate(docs) if docs else np.zeros(0, np.int64), np.array([len(d) for d in docs], np.int64)]
    return tuple(out)


_TOKENIZERS = {}


def _worker_tokenizer(spec, tokenizer_json):
    key = (spec, tokenizer_json)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = from_spec(spec, tokenizer_json)
    return _TOKENIZERS[key]


def _append(writer: ShardWriter, tokens: np.ndarray, lengths: np.ndarray) -> None:
    for doc in np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else ():
        writer.add(doc)


def prepare(inputs: Sequence[str], out: Path, tokenizer: str = "byte", vocab_size: int = 8192,
            val_fraction: float = 0.02, workers: int = 1, dtype: Optional[str] = None, jsonl_key: str = "text",
            progress: bool = True, files: Optional[List[Path]] = None) -> dict:
    """Tokenize `inputs` into `out/{train,val}.{bin,idx}` + `meta.json`; returns the metadata."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise DataError(f"--out {out} exists and is not a prepared dataset; choose a new directory.")
    files = files if files is not None else collect_files(inputs, "input")
    if tokenizer == "bpe":
        texts = (text for f in files for text in read_documents(f, jsonl_key))
        tok = BPETokenizer.train(texts, vocab_size)
    else:
        tok = from_spec(tokenizer)
    token_type = np.dtype(dtype) if dtype else token_dtype(tok.vocab_size)
    check_vocab_fits(tok.vocab_size, token_type, out)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _write_shards(files, tmp, tok, tokenizer, token_type, val_fraction, workers, jsonl_key, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def _write_shards(files, directory: Path, tok, spec: str, token_type, val_fraction, workers, jsonl_key, progress) -> dict:
    tokenizer_json = tok.to_json()
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(tokenizer_json)
    spec = "byte" if tok.name == "byte" else "bpe"
    jobs = [(f, spec, tokenizer_json, val_fraction, jsonl_key) for f in files]
    train, val = ShardWriter(directory / "train", token_type), ShardWriter(directory / "val", token_type)
    bar = _progress(len(jobs), progress)
    with _pool(workers) as pool:
        results = pool.imap(_tokenize_file, jobs, chunksize=max(1, len(jobs) // (64 * max(workers, 1)))) \
            if pool else map(_tokenize_file, jobs)
        for train_tokens, train_lengths, val_tokens, val_lengths in results:
            _append(train, train_tokens, train_lengths)
            _append(val, val_tokens, val_lengths)
            bar.update(1)
    bar.close()
    if val_fraction > 0 and (not val.lengths or not train.lengths):
        source, target = (train, val) if train.lengths else (val, train)  # hold out the stream's tail instead
        target.add(source.take_tail(val_fraction if train.lengths else 1 - val_fraction))
    if train.tokens < 2:
        raise DataError(f"{', '.join(map(str, files[:3]))}: the corpus tokenizes to fewer than 2 tokens; give more text.")
    train.close()
    val.close()
    meta = {"format": FORMAT, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eos": tok.eos,
            "dtype": token_type.name, "train_tokens": train.tokens, "val_tokens": val.tokens,
            "train_documents": len(train.lengths), "val_documents": len(val.lengths), "files": len(files)}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class _NoPool:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    if workers <= 1:
        return _NoPool()
    # fork where there is one: workers need no re-import of the caller (plait-train has torch loaded)
    # and only run numpy and tokenizers code
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="tokenizing", disable=not enabled, leave=False)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plait data prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="text files, directories, .jsonl files")
    parser.add_argument("--out", required=True, help="output directory (train/val .bin/.idx + meta.json)")
    parser.add_argument("--tokenizer", default="byte", help="byte | bpe (trained on the inputs) | path to tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a trained BPE")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--dtype", choices=["uint16", "uint32", "int32"], default=None,
                        help="token dtype (default: uint16 when the vocabulary fits, else uint32)")
    parser.add_argument("--jsonl-key", default="text")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.inputs, Path(args.out), args.tokenizer, args.vocab_size, args.val_fraction,
                       args.workers, args.dtype, args.jsonl_key, progress=not args.quiet)
    except DataError as error:
        print(f"plait data prepare: error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"{args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
          f"({meta['tokenizer']}, vocabulary {meta['vocab_size']}, {meta['dtype']})")
    return 0
