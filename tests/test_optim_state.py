"""Optimizer state after a save and a load sits where the optimizer itself puts it.

For every optimizer plait builds (AdamW fused and foreach, Lion's kernels, Muon with AdamW
beside it, each also inside ZeRO-1): take one step, save the name-keyed state, load it into a fresh optimizer,
and compare every state tensor's device and dtype with those of a third, fresh optimizer
after one step of its own; values must equal the saved ones, and the next step must be the
same step the uninterrupted optimizer takes (bitwise). On CUDA this is the resume bug
found on an H200 (fused AdamW's `step` left on the CPU); on CPU the same test runs in CI.
"""

import pytest
import torch

from plait.optim.builder import build_optimizer
from plait.optim.config import OptimConfig
from plait.optim.state import load_named_state, named_state
from plait.parallel.config import ParallelConfig
from plait.parallel.data_parallel import DataParallelGrads
from plait.parallel.grid import Grid
from plait.parallel.zero import ZeroOptimizer
from plait.optim.builder import make_optimizer
from plait.optim.groups import param_groups, standard_group
from plait.optim.muon import muon_group_of
from plait.parallel.matrices import ShardedMatrices
from plait.parallel.sharding import ShardSpec

VARIANTS = [("adamw", "fused"), ("adamw", "foreach"), ("lion", "compiled"), ("lion", "foreach"), ("lion", "triton"),
            ("muon", "auto")]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(24, 16))
        self.norm = torch.nn.Parameter(torch.ones(16))
        self.v = torch.nn.Parameter(torch.randn(7))


def build(name, impl, zero, device):
    """(module, optimizer, named params) on `device`, the same start values every time."""
    torch.manual_seed(0)
    module = Tiny().to(device)
    cfg = OptimConfig(name=name, impl=impl, lr=1e-2)
    named = dict(module.named_parameters())
    grid = Grid.single(torch.device(device))
    group_of, matrices = None, None
    if name == "muon":  # Muon steps the matrix w, AdamW the rest; under ZeRO-1 it puts w together from its pieces
        group_of = muon_group_of(standard_group, lambda n: n == "w")
        matrices = ShardedMatrices({"w": ShardSpec((24, 16))}, grid, sharded_over_dp=zero)
    if not zero:
        return module, build_optimizer(named, cfg, group_of, torch.device(device), matrices), named
    grads = DataParallelGrads([module], grid, ParallelConfig(zero=1), shard=True)
    optimizer = ZeroOptimizer(grads, grid, lambda groups: make_optimizer(groups, cfg, torch.device(device), matrices),
                              param_groups(named, cfg.weight_decay, group_of))
    return module, optimizer, named


def step(module, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        grad = torch.randn(param.shape, generator=generator).to(param.device)
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.copy_(grad)
    optimizer.step()


def placements(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)
    return [{key: (value.device, value.dtype) for key, value in inner.state[p].items() if torch.is_tensor(value)}
            for group in inner.param_groups for p in group["params"]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero", [False, True], ids=["plain", "zero1"])
@pytest.mark.parametrize("name,impl", VARIANTS, ids=[f"{n}-{i}" for n, i in VARIANTS])
def test_loaded_state_sits_where_a_fresh_step_puts_it(name, impl, zero, device, monkeypatch):
    if impl == "triton":
        pytest.importorskip("triton")
        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    module, optimizer, named = build(name, impl, zero, device)
    step(module, optimizer, 1)
    saved = {n: {k: v.cpu() for k, v in entry.items()} for n, entry in named_state(optimizer, named).items()}
    assert saved and all(v.device.type == "cpu" for entry in saved.values() for v in entry.values())

    fresh_module, fresh, fresh_named = build(name, impl, zero, device)
    step(fresh_module, fresh, 1)
    resumed_module, resumed, resumed_named = build(name, impl, zero, device)
    with torch.no_grad():
        for param, source in zip(resumed_module.parameters(), module.parameters()):
            param.copy_(source)
    load_named_state(resumed, resumed_named, saved)
    assert placements(resumed) == placements(fresh)
    for n, entry in named_state(resumed, resumed_named).items():
        for key, value in entry.items():
            assert torch.equal(value.cpu(), saved[n][key]), (n, key)

    step(module, optimizer, 2)
    step(resumed_module, resumed, 2)
    for (n, a), b in zip(module.named_parameters(), resumed_module.parameters()):
        assert torch.equal(a, b), f"{n} differs after the resumed step"
