"""Which sample each global position reads: a pure function of (seed, stream, position), O(batch) work and memory.

Position g (step x batch_size + slot) is mapped in two stages, both by keyed permutations
computed on the fly (a 4-round Feistel network with cycle-walking, so a permutation of
[0, n) costs nothing to build and nothing to store, whatever n is):

1. Blending. Positions come in blocks of BLOCK = 1000. In every block, dataset d owns
   q_d slots (largest-remainder rounding of BLOCK x weight_d, so proportions are exact to
   1/BLOCK over every whole block), scattered over the block by a permutation keyed by
   (seed, stream, block). Slot j of dataset d in block b is d's sample counter
   k = b x q_d + (rank of j among d's slots).
2. Epochs. Dataset d's counter k falls in epoch k // n_d; within the epoch a permutation
   keyed by (seed, stream, d, epoch) picks the sample, so each sample is read once per
   epoch and distinct positions of one epoch never read the same sample.

Indices therefore come from (seed, epoch, step, dp rank) alone: no index files, no start-up
build, no state beyond the step.
"""

import functools
from typing import Sequence, Tuple

import numpy as np

from plait.data.errors import DataError

BLOCK = 1000
MULTIPLIERS = (0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93, 0xA0761D6478BD642F)


def _mix_int(x: int) -> int:
    """splitmix64 finalizer on a Python int."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def key_of(*parts: int) -> int:
    """A 64-bit key from a few integers."""
    key = 0
    for part in parts:
        key = _mix_int(key ^ ((part + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF))
    return key


@functools.lru_cache(maxsize=64)
def _rounds(key: int, bits: int):
    """Per-round (xor key, odd multiplier) pairs for a permutation of 2^bits values."""
    return [(np.uint64(_mix_int(key + r) & ((1 << bits) - 1)), np.uint64(m | 1)) for r, m in enumerate(MULTIPLIERS)]


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """Element `index` of the permutation of [0, n) keyed by `key` (vectorized over `index`).

    On the smallest power-of-two domain 2^b >= n, a few rounds of bijective steps mod 2^b
    (xor a round key, multiply by an odd constant, xor-shift right) scramble the index;
    values that land in [n, 2^b) are scrambled again (cycle-walking; 2^b < 2n, so
    under two passes on average). Each step is invertible, so the whole map is a permutation.
    """
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros(index.shape, dtype=np.int64)
    bits = int(n - 1).bit_length()
    mask, shift = np.uint64((1 << bits) - 1), np.uint64(max(1, bits // 2))
    rounds = _rounds(key, bits)
    out = index.copy()
    todo = out if out.size else None
    while todo is not None:
        x = todo
        with np.errstate(over="ignore"):
            for round_key, multiplier in rounds:
                x = ((x ^ round_key) * multiplier) & mask
                x ^= x >> shift
        if out is todo:
            out = x
        else:
            out[outside] = x
        outside = np.flatnonzero(out >= np.uint64(n))
        todo = out[outside] if outside.size else None
    return out.astype(np.int64)


def quotas(weights: Sequence[float], names: Sequence[str]) -> np.ndarray:
    """Slots per BLOCK for each dataset: largest-remainder rounding of BLOCK x normalized weight."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise DataError(f"data.weights={list(weights)} must be non-negative with a positive sum.")
    exact = BLOCK * w / w.sum()
    q = np.floor(exact).astype(np.int64)
    q[np.argsort(-(exact - q), kind="stable")[:BLOCK - q.sum()]] += 1
    for name, weight, slots in zip(names, w, q):
        if weight > 0 and slots == 0:
            raise DataError(f"data weight {weight} of {name} is under 1/{BLOCK} of the blend; raise it or drop the dataset.")
    return q


class Sampler:
    """`(dataset ids, sample ids) = sampler(positions)` for datasets of `sizes` samples blended by `weights`."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, stream: int = 0,
                 names: Sequence[str] = ()):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.quota = quotas(weights, names or [f"dataset {i}" for i in range(len(sizes))])
        self.first_slot = np.concatenate([[0], np.cumsum(self.quota)[:-1]])
        self.seed, self.stream = seed, stream

    def __call__(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.sizes) == 1:  # nothing to blend: the position is the sample counter
            dataset, counter = np.zeros_like(positions), positions
        else:
            dataset, counter = self._blend(positions)
        size = self.sizes[dataset]
        epoch, within = counter // size, counter % size
        samples = np.empty_like(counter)
        for d, e in {(int(d), int(e)) for d, e in zip(*self._corners(dataset, epoch))}:
            mine = (dataset == d) & (epoch == e)  # one vectorized permutation per (dataset, epoch) present
            samples[mine] = permute(within[mine], int(self.sizes[d]), key_of(self.seed, self.stream, d, e))
        return dataset, samples

    @staticmethod
    def _corners(dataset: np.ndarray, epoch: np.ndarray):
        """The (dataset, epoch) pairs present, without a Python loop over samples."""
        pairs = np.unique(dataset * (1 << 40) + epoch)
        return pairs >> 40, pairs & ((1 << 40) - 1)

    def _blend(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        block, slot = positions // BLOCK, positions % BLOCK
        scattered = np.empty_like(slot)
        for b in np.unique(block):
            mine = block == b
            scattered[mine] = permute(slot[mine], BLOCK, key_of(self.seed, self.stream, -1, int(b)))
        dataset = np.searchsorted(self.first_slot, scattered, side="right") - 1
        return dataset, block * self.quota[dataset] + (scattered - self.first_slot[dataset])
