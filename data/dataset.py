"""Token datasets: windows of seq_len+1 tokens over memory-mapped shards, gathered on the device.

Sample i of a span of tokens [start, end) is the window starting at start + i x seq_len
(seq_len+1 tokens: inputs and the shifted targets overlap by one, as in Megatron). Windows
run straight across document boundaries (the end-of-document token separates them). The
window matrix is a strided view of the shard, never materialized, so opening a dataset
costs only mapping its files. A `TokenDataset` chains spans (several shards, or the part
of a shard kept for training) into one numbered list of samples.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch

from plait.data.errors import DataError
from plait.data.shards import TokenShard
from plait.data.unified import UnifiedTensor

# Token dtype -> (the signed type torch gathers in, the type whose bits it is, for widening to int64).
_STORAGE = {np.dtype(np.uint8): (np.uint8, torch.uint8), np.dtype(np.int8): (np.int8, torch.int8),
            np.dtype(np.uint16): (np.int16, torch.uint16), np.dtype(np.int16): (np.int16, torch.int16),
            np.dtype(np.uint32): (np.int32, torch.uint32), np.dtype(np.int32): (np.int32, torch.int32),
            np.dtype(np.int64): (np.int64, torch.int64)}


class OpenShard:
    """A shard's tokens as a `UnifiedTensor` on `device` (registered once, shared by its spans)."""

    def __init__(self, shard: TokenShard, device: torch.device, mode: str = "auto"):
        self.shard = shard
        signed, self.bits_type = _STORAGE[shard.dtype]
        self.unified = UnifiedTensor(shard.tokens.view(signed), device, mode)

    def close(self) -> None:
        self.unified.close()


@dataclass
class TokenSpan:
    """Tokens [start, end) of one open shard."""

    source: OpenShard
    start: int
    end: int

    @property
    def name(self) -> str:
        return str(self.source.shard.bin_path)

    def __len__(self) -> int:
        return self.end - self.start


class TokenDataset:
    """Numbered windows of seq_len+1 tokens over one or more spans; `gather(ids)` -> int64 [len(ids), seq_len+1]."""

    def __init__(self, spans: Sequence[TokenSpan], seq_len: int, name: str = ""):
        self.seq_len, self.name = seq_len, name or ", ".join(s.name for s in spans[:2])
        self.spans = [s for s in spans if (len(s) - 1) // seq_len > 0]
        if not self.spans:
            tokens = sum(len(s) for s in spans)
            raise DataError(f"{self.name} holds {tokens} tokens, fewer than one window of train.seq_len+1="
                            f"{seq_len + 1}; use more text or a shorter train.seq_len.")
        counts = [(len(s) - 1) // seq_len for s in self.spans]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.windows = [s.source.unified.strided((n, seq_len + 1), (seq_len, 1), s.start)
                        for s, n in zip(self.spans, counts)]
        self.device = self.windows[0].device

    def __len__(self) -> int:
        return int(self.first[-1])

    def offsets(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(span number, token offset in its shard) of each sample: for tests and references."""
        span = np.searchsorted(self.first, ids, side="right") - 1
        starts = np.array([s.start for s in self.spans], dtype=np.int64)
        return span, starts[span] + (ids - self.first[span]) * self.seq_len

    def gather(self, ids: np.ndarray) -> torch.Tensor:
        """Windows `ids`, gathered where the tokens live (the GPU reads unified host memory) and widened to int64."""
        if len(self.spans) == 1:
            return self._gather_span(0, ids)
        span = np.searchsorted(self.first, ids, side="right") - 1
        out = torch.empty((len(ids), self.seq_len + 1), dtype=torch.int64, device=self.device)
        for s in np.unique(span):
            mine = np.flatnonzero(span == s)
            rows = self._gather_span(int(s), ids[mine] - self.first[s])
            out.index_copy_(0, torch.from_numpy(mine).to(self.device), rows)
        return out

    def _gather_span(self, span: int, local: np.ndarray) -> torch.Tensor:
        windows = self.windows[span]
        index = torch.from_numpy(np.ascontiguousarray(local, dtype=np.int64)).to(windows.index_device())
        rows = windows.gather(index)
        return rows.view(self.spans[span].source.bits_type).to(torch.int64)


def train_tokens(shard: TokenShard, val_fraction: float) -> int:
    """Where training stops in a shard that has no separate validation file: the last `val_fraction` of its
    tokens are held out (at least one token each side)."""
    total = len(shard)
    return min(max(1, int(total * (1 - val_fraction))), total - 1) if val_fraction > 0 else total
