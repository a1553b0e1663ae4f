"""The loader: batches from (seed, step, dp rank) alone; no workers, no per-sample Python, state = a few ints.

For step k the global batch is positions [k B, (k+1) B) of the sampler (`plait.data.sampler`:
blend, then per-epoch permutation, all computed on the fly). dp rank r takes the r-th
contiguous slice of B / dp positions and splits it, in order, into `microbatches`
micro-batches, so the global batch is the same whatever dp is, ranks of one step never read
the same sample (within an epoch), and resuming at step k replays exactly the batches of an
uninterrupted run. The windows are gathered where the tokens live: a unified tensor lets
the GPU read them from pinned host memory in place (`plait.data.unified`).

Sampling is a pure function, but is computed a chunk of positions at a time and memoized
(the last chunk only), so its Python overhead is paid once per few hundred steps.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from plait.data.dataset import OpenShard, TokenDataset, TokenSpan
from plait.data.errors import DataError
from plait.data.rampup import BatchRamp
from plait.data.sampler import Sampler
from plait.data.shards import TokenShard
from plait.parallel.layout import LayoutError, micro_batch_size

log = logging.getLogger("plait")

CHUNK_POSITIONS = 8192
TRAIN_STREAM, VAL_STREAM = 0, 1


class _Stream:
    """A blend of datasets read by global position, with the sampler's output memoized one chunk at a time."""

    def __init__(self, datasets: Sequence[TokenDataset], weights: Sequence[float], seed: int, stream: int):
        self.datasets = list(datasets)
        self.sampler = Sampler([len(d) for d in datasets], weights, seed, stream, [d.name for d in datasets])
        self._chunk, self._ids = -1, None

    def samples(self, start: int, count: int):
        """(dataset ids, sample ids) of positions [start, start + count)."""
        first, last = start // CHUNK_POSITIONS, (start + count - 1) // CHUNK_POSITIONS
        if first != last or count > CHUNK_POSITIONS:
            return self.sampler(np.arange(start, start + count))
        if first != self._chunk:
            self._ids = self.sampler(np.arange(first * CHUNK_POSITIONS, (first + 1) * CHUNK_POSITIONS))
            self._chunk = first
        begin = start - first * CHUNK_POSITIONS
        return self._ids[0][begin:begin + count], self._ids[1][begin:begin + count]

    def gather(self, start: int, count: int) -> torch.Tensor:
        dataset, sample = self.samples(start, count)
        if len(self.datasets) == 1:
            return self.datasets[0].gather(sample)
        first = self.datasets[0]
        out = torch.empty((count, first.seq_len + 1), dtype=torch.int64, device=first.device)
        for d in np.unique(dataset):
            rows = np.flatnonzero(dataset == d)
            out.index_copy_(0, torch.from_numpy(rows).to(first.device), self.datasets[d].gather(sample[rows]))
        return out


def _as_list(items) -> list:
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


class Loader:
    """`batch(step)` -> LongTensor [microbatches, micro_batch, seq_len+1] for this dp rank; `val_batch(i)` alike."""

    def __init__(self, train: Any, val: Any, seq_len: int, batch_size: int, microbatches: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, device: torch.device = torch.device("cpu"),
                 weights: Optional[Sequence[float]] = None, ramp: Optional[BatchRamp] = None):
        """`train` and `val`: a TokenDataset, a shard path (`x.bin`, `x.idx` or `x`), or a list of them (a blend,
        mixed by `weights`); `val` may be None. Paths are opened on `device` and closed by `close()`. `ramp`: the
        training batch grows over the first steps (`plait.data.rampup.BatchRamp`; validation batches do not)."""
        self._closers: List = []
        train = [self._dataset(t, seq_len, device) for t in _as_list(train)]
        val = [self._dataset(v, seq_len, device) for v in _as_list(val)]
        weights = list(weights) if weights is not None else [1.0] * len(train)
        try:
            self.micro_batch = micro_batch_size(batch_size, dp_size, microbatches)
        except LayoutError as error:
            raise DataError(str(error)) from None
        self.batch_size, self.microbatches, self.dp_rank, self.dp_size = batch_size, microbatches, dp_rank, dp_size
        self.seq_len = seq_len
        self.seed, self.step = seed, 0
        self.ramp = ramp
        self.weights = weights
        self.tokenizer: Optional[str] = None  # what made the tokens ("byte", a tokenizer.json), when known
        self.eos: Optional[int] = None  # their end-of-document token, when known
        self.val_weights = weights if len(val) == len(train) else [1.0] * len(val)
        self._open_streams(train, val)

    def _dataset(self, item, seq_len: int, device) -> TokenDataset:
        if isinstance(item, TokenDataset):
            if item.seq_len != seq_len:
                raise DataError(f"{item.name} was opened for seq_len {item.seq_len}, not {seq_len}.")
            return item
        shard = OpenShard(TokenShard(item), torch.device(device))
        self._closers.append(shard.close)
        return TokenDataset([TokenSpan(shard, 0, len(shard.shard))], seq_len)

    def _open_streams(self, train: Sequence[TokenDataset], val: Sequence[TokenDataset]) -> None:
        self.train = _Stream(train, self.weights, self.seed, TRAIN_STREAM)
        self.val = _Stream(val, self.val_weights, self.seed, VAL_STREAM) if val else None

    def _local(self, stream: _Stream, first: int, batch_size: int) -> torch.Tensor:
        """This dp rank's share of the global batch of `batch_size` sequences from stream position `first`."""
        per_rank = batch_size // self.dp_size
        return stream.gather(first + self.dp_rank * per_rank, per_rank).view(
            per_rank // self.micro_batch, self.micro_batch, self.seq_len + 1)

    def batch_at(self, step: int) -> Tuple[int, int]:
        """(sequences read before training step `step`, its global batch size)."""
        return self.ramp.at(step) if self.ramp is not None else (step * self.batch_size, self.batch_size)

    def batch(self, step: int) -> torch.Tensor:
        """This rank's micro-batches of training step `step` (a pure function of seed, step, dp rank); under a
        ramp, fewer micro-batches of the same size while the batch grows."""
        self.step = step + 1
        return self._local(self.train, *self.batch_at(step))

    def next(self) -> torch.Tensor:
        """The batch after the last one read (step 0 first; continues from `load_state`)."""
        return self.batch(self.step)

    def val_batch(self, index: int) -> torch.Tensor:
        """Validation batch `index`: the same for every run with this seed (its own sample stream)."""
        if self.val is None:
            raise DataError("the data has no validation split (too short for one window); set train.eval_every=0 "
                            "or raise data.val_fraction.")
        return self._local(self.val, index * self.batch_size, self.batch_size)

    def state(self) -> Dict[str, int]:
        """Everything needed to resume exactly: the next step, the seed, the batch size it assumes and its ramp."""
        ramp = self.ramp
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size,
                "rampup": [ramp.start, ramp.increment, ramp.samples] if ramp is not None else None}

    def load_state(self, state: Dict[str, int]) -> None:
        if int(state["batch_size"]) != self.batch_size:
            raise DataError(f"the checkpoint's loader read batches of {state['batch_size']} but train.batch_size="
                            f"{self.batch_size}; resume with train.batch_size={state['batch_size']}.")
        ramp = self.state()["rampup"]
        if state.get("rampup") != ramp:
            saved = state.get("rampup")
            raise DataError(f"the checkpoint's run ramped its batch as train.rampup_batch_size={saved} but this one "
                            f"sets {ramp}; resume with train.rampup_batch_size={saved if saved else 'null'}.")
        if int(state["seed"]) != self.seed:
            log.warning("data: resuming with the checkpoint's loader seed %s (not %s)", state["seed"], self.seed)
            self.seed = int(state["seed"])
            self._open_streams(self.train.datasets, self.val.datasets if self.val else [])
        self.step = int(state["step"])

    def close(self) -> None:
        """Release the datasets' unified tensors (unregisters pinned host memory on CUDA)."""
        for close in self._closers:
            close()
        self._closers = []

    @classmethod
    def from_config(cls, cfg, seq_len: int, batch_size: int, microbatches: int, dp_rank: int = 0, dp_size: int = 1,
                    seed: int = 0, device: torch.device = torch.device("cpu"),
                    model_vocab: Optional[int] = None, ramp: Optional[BatchRamp] = None) -> "Loader":
        """Open every corpus `cfg` (a DataConfig) names, preparing text into the cache first when needed."""
        from plait.data.sources import open_sources

        sources, weights = open_sources(cfg, seq_len, torch.device(device), model_vocab)
        vals = [s.val for s in sources]
        val = vals if all(v is not None for v in vals) else [v for v in vals if v is not None]
        loader = cls([s.train for s in sources], val, seq_len, batch_size, microbatches, dp_rank, dp_size, seed,
                     device, weights, ramp)
        loader._closers += [s.close for s in sources]
        loader.tokenizer = _shared(s.tokenizer for s in sources)  # recorded in checkpoints for `plait generate`
        loader.eos = cfg.eos_id if cfg.eos_id is not None else _shared(s.eos for s in sources)
        return loader


def _shared(values) -> Any:
    """The value every corpus recorded (a tokenizer, an end-of-document token), or None (one unknown, or
    corpora that differ)."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None
