"""Text to token ids: bytes (vocabulary 256, end of document = byte 0), or a Hugging Face `tokenizers` BPE.

A BPE is either loaded from a local `tokenizer.json` or trained on the corpus itself
(byte-level BPE, `<|endoftext|>` as its end-of-document token). Workers rebuild the
tokenizer from its JSON string, so a tokenizer crosses process boundaries as text.
"""

from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from plait.data.errors import DataError

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; byte 0 (never in text) ends a document."""

    name, vocab_size, eos = "byte", 256, 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a byte sequence cut inside a character, or an id past the bytes from a model with a larger
        vocabulary, shows U+FFFD there: 0xFF never starts a UTF-8 character)."""
        return bytes(min(int(i), 0xFF) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> Optional[str]:
        return None


class BPETokenizer:
    """A Hugging Face `tokenizers.Tokenizer`; `eos` is its end-of-text token."""

    name = "bpe"

    def __init__(self, tokenizer, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [tokenizer.token_to_id(name) for name in EOS_NAMES]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise DataError(f"{source} has none of the end-of-text tokens {', '.join(EOS_NAMES)}; add one.")
        self.eos = ids[0]

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"data.tokenizer={path}: no tokenizer.json there; give a local tokenizer.json, 'byte' or 'bpe'.")
        return cls(Tokenizer.from_file(str(file)), str(file))

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Byte-level BPE trained on `texts` (deterministic for the same texts in the same order)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer, "trained BPE")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> Optional[str]:
        return self.tokenizer.to_str()


def from_spec(spec: str, json_text: Optional[str] = None):
    """'byte' -> bytes; a stored JSON string (workers) or a tokenizer.json path -> BPE."""
    if spec == "byte":
        return ByteTokenizer()
    if json_text is not None:
        return BPETokenizer.from_json(json_text)
    return BPETokenizer.load(spec)
