"""plait's loader and activation offload in a plain PyTorch loop (no grid, no Trainer).

1. Tokens of your own: any integer array goes into a Megatron-format shard with
   `plait.data.ShardWriter` (here: the bytes of a few standard-library files).
2. `plait.data.Loader` gives the batch of step k as a pure function of (seed, step): no
   worker processes, exact resume from `loader.state()`. On a GPU the rows are gathered
   by the GPU straight from pinned host memory (the unified tensor); on CPU, in place.
3. `plait.offload.ActivationOffload` moves the activations autograd saves during forward
   to files (or host memory) and reads them back, ahead of need, during backward. It
   needs only a module with its blocks in `.layers` (an `nn.ModuleDict`, in order).

    python examples/loader_offload_plain.py --steps 30 --scratch /tmp/offload

Prints `step <k> loss <value>` lines, then the bytes offloaded and the largest gradient
difference between the first step with offload and the same step without it.
"""

import argparse
import shutil
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plait.data import Loader, ShardWriter
from plait.offload import ActivationOffload, OffloadConfig

FILES = ["argparse.py", "textwrap.py", "json/encoder.py", "dataclasses.py"]


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(x)


class TinyGPT(nn.Module):
    def __init__(self, dim: int = 64, n_layers: int = 3, seq_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.layers = nn.ModuleDict({str(i): Block(dim) for i in range(n_layers)})  # offload's layer boundaries
        self.head = nn.Linear(dim, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.layers.values():
            x = block(x)
        return self.head(x)


def write_shard(prefix: Path) -> Path:
    """The bytes of a few stdlib files as one token shard (one document per file, 0 ends a document)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    writer = ShardWriter(prefix, np.uint16)
    for name in FILES:
        writer.add(np.append(np.frombuffer((stdlib / name).read_bytes(), dtype=np.uint8), 0).astype(np.uint16))
    writer.close()
    return prefix


def grads_of(model: nn.Module, tokens: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scratch", default=None, help="directory for offloaded activations (default: a temp dir)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="plait-example-"))
    seq_len, batch_size = 64, 8

    loader = Loader(write_shard(work / "stdlib"), None, seq_len, batch_size, microbatches=1, seed=0, device=device)
    model = TinyGPT(seq_len=seq_len).to(device)
    first = loader.batch(0)[0]  # [batch, seq_len + 1]: micro-batch 0 of step 0
    reference = grads_of(model, first)  # the same step without offload, to compare against

    # "file": one file per saved tensor under --scratch; "all": CPU tensors move too (on GPUs, keep "cuda")
    offload = ActivationOffload(OffloadConfig(backend="file", path=args.scratch or str(work / "scratch"),
                                              device_filter="all", min_bytes=4096, keep_last=0), device=device)
    offload.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    written, max_diff = 0, None
    for step in range(args.steps):
        tokens = loader.batch(step)[0]
        with offload.step():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        written += int(offload.last_metrics["offload_written_bytes"])
        if step == 0:  # same weights, same batch: offload must not change a single gradient bit
            max_diff = max(float((p.grad - reference[n]).abs().max()) for n, p in model.named_parameters())
        optimizer.step()
        if step == 0 or (step + 1) % 10 == 0:
            print(f"step {step + 1} loss {loss.item():.4f}", flush=True)
    print(f"offloaded {written} bytes; loader state {loader.state()}; max grad diff vs no offload {max_diff:g}")
    offload.close()
    loader.close()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
