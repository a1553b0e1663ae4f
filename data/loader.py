"""Batches of token windows from (seed, step, dp rank) alone: a resumable, worker-free loader.

For step k the global batch is `batch_size` windows of seq_len+1 tokens at offsets drawn
from a generator seeded by (seed, k); dp rank r takes its contiguous slice and splits it
into micro-batches. Nothing else is state, so resuming at step k replays exactly the
batches an uninterrupted run sees, and the global batch is the same under any dp.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch


class TokenWindows:
    """Random windows of a memory-mapped uint16 token file."""

    def __init__(self, path: Path, seq_len: int):
        self.path = Path(path)
        self.tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        self.seq_len = seq_len
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"{self.path} holds {len(self.tokens)} tokens, fewer than one window of "
                             f"train.seq_len+1={seq_len + 1}; use more text or a shorter train.seq_len.")

    def offsets(self, seed: int, step: int, count: int, stream: int = 0) -> np.ndarray:
        generator = np.random.default_rng([seed, stream, step])
        return generator.integers(0, len(self.tokens) - self.seq_len - 1, size=count)

    def gather(self, offsets: np.ndarray) -> torch.Tensor:
        index = offsets[:, None] + np.arange(self.seq_len + 1)
        return torch.from_numpy(self.tokens[index].astype(np.int64))


class Loader:
    """`batch(step)` -> LongTensor [microbatches, micro_batch, seq_len+1] for this dp rank."""

    def __init__(self, train_path: Path, val_path: Optional[Path], seq_len: int, batch_size: int,
                 microbatches: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 device: torch.device = torch.device("cpu")):
        self.train = TokenWindows(train_path, seq_len)
        self.val = TokenWindows(val_path, seq_len) if val_path is not None else None
        self.batch_size, self.microbatches = batch_size, microbatches
        self.dp_rank, self.dp_size, self.seed, self.device = dp_rank, dp_size, seed, device
        self.micro_batch = batch_size // (dp_size * microbatches)

    def _local(self, windows: TokenWindows, step: int, stream: int) -> torch.Tensor:
        offsets = windows.offsets(self.seed, step, self.batch_size, stream)
        per_rank = self.batch_size // self.dp_size
        mine = offsets[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        batch = windows.gather(mine).view(self.microbatches, self.micro_batch, -1)
        return batch.to(self.device, non_blocking=True)

    def batch(self, step: int) -> torch.Tensor:
        return self._local(self.train, step, 0)

    def val_batch(self, index: int) -> torch.Tensor:
        return self._local(self.val, index, 1)

    def state(self) -> dict:
        return {"seed": self.seed}
