"""plait's Lion and muP in a plain single-device PyTorch model and loop (nothing else of plait).

The model is an ordinary `nn.Module`: a byte-level MLP language model that predicts the
next byte from the previous four. muP needs three things from it, all plain numbers:
the full shapes of its parameters at the target width, at a base width and at a wider
"delta" width (built on the meta device, no memory), and the name of the readout.
`plait.optim.mup_table` turns them into one role per parameter name: hidden matrices get
init std / sqrt(m), learning rate / m and weight decay x m, and the readout's logits are
multiplied by 1 / m in forward (m = width / base width). `plait.optim.Lion` steps the
param groups `plait.optim.param_groups` builds from that table.

    python examples/lion_mup_plain.py --width 256 --steps 60

Prints `step <k> loss <value>` every 10 steps and the groups' learning rates.
"""

import argparse
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plait.optim import Lion, forward_scales, group_key, mup_table, param_groups

CONTEXT, VOCAB, BASE_WIDTH = 4, 256, 32


class ByteMLP(nn.Module):
    """Embed the last CONTEXT bytes, two hidden layers, a readout over 256 bytes."""

    def __init__(self, width: int, readout_mult: float = 1.0, device=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width, device=device)
        self.hidden1 = nn.Linear(CONTEXT * width, width, device=device)
        self.hidden2 = nn.Linear(width, width, device=device)
        self.readout = nn.Linear(width, VOCAB, bias=False, device=device)
        self.readout_mult = readout_mult  # muP: logits x output_mult / width_mult

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.embed(context).flatten(1)
        x = F.gelu(self.hidden1(x))
        x = F.gelu(self.hidden2(x))
        return self.readout(x) * self.readout_mult


def shapes(width: int) -> dict:
    return {name: tuple(p.shape) for name, p in ByteMLP(width, device="meta").named_parameters()}


def byte_windows(device: torch.device, limit: int = 200_000) -> torch.Tensor:
    """Sliding windows of CONTEXT + 1 bytes of one standard-library source file."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_bytes()[:limit]
    data = torch.tensor(list(text), dtype=torch.long, device=device)
    return data.unfold(0, CONTEXT + 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-3, help="the base width's learning rate")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    # muP: one role per parameter name, from plain shapes at three widths
    table = mup_table(shapes(args.width), shapes(BASE_WIDTH), shapes(2 * BASE_WIDTH), readout=["readout.weight"])
    scales = forward_scales(table["readout.weight"].width_mult, head_dim=1, base_head_dim=1)
    model = ByteMLP(args.width, scales.logits, device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:  # matrices: standard 1/sqrt(fan_in) std, times muP's init multiplier
                fan_in = param.shape[1] if name != "embed.weight" else 1
                param.normal_(0.0, table[name].init_mult / math.sqrt(fan_in))

    # Lion over muP's groups: each group's lr is the base lr times its multiplier
    groups = param_groups(dict(model.named_parameters()), weight_decay=0.1, group_of=group_key(table))
    for group in groups:
        group["lr"] = args.lr * group["lr_mult"]
    optimizer = Lion(groups, lr=args.lr, betas=(0.9, 0.99), impl="foreach")
    for group in optimizer.param_groups:
        print(f"group {group['group_name']}: lr {group['lr']:.3g} weight_decay {group['weight_decay']:.3g} "
              f"({len(group['params'])} tensors)")

    windows = byte_windows(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(windows), (args.batch,), generator=generator).to(device)
        batch = windows[rows]
        loss = F.cross_entropy(model(batch[:, :-1]), batch[:, -1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
