"""Lion: every kernel equals the paper's rule (a plain reference) and lion-pytorch exactly in fp32,
on matrices, vectors and ZeRO-1-style flat 1-D tensors, with per-group lr and weight decay."""

import logging

import pytest
import torch

from plait.optim.lion import Lion
from plait.optim.state import load_named_state, named_state

STEPS = 6
SHAPES = [(37, 5), (1000,), (64, 48)]


def paper_lion(p, g, m, lr, wd, beta1, beta2):
    """Chen et al. 2023, Algorithm 2, written out one tensor at a time."""
    c = m.clone().mul_(beta1).add_(g, alpha=1 - beta1)
    p.mul_(1 - lr * wd)
    p.add_(torch.sign(c), alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1 - beta2)


def run(make, groups_spec, grads):
    """Step an optimizer over fresh copies of the start values; returns (params, exp_avgs)."""
    torch.manual_seed(0)
    starts = [torch.randn(s) for s in SHAPES]
    tensors = [t.clone().requires_grad_(True) for t in starts]
    groups = [{"params": [tensors[i] for i in idx], **hyper} for idx, hyper in groups_spec]
    optimizer = make(groups)
    for step_grads in grads:
        for t, g in zip(tensors, step_grads):
            t.grad = g.clone()
        optimizer.step()
    return [t.detach() for t in tensors], [optimizer.state[t]["exp_avg"] for t in tensors], optimizer


@pytest.mark.parametrize("impl", ["foreach", "compiled"])
def test_lion_equals_paper_rule_and_lion_pytorch(impl):
    import lion_pytorch

    torch.manual_seed(1)
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(STEPS)]
    groups_spec = [([0, 2], {"lr": 3e-2, "weight_decay": 0.5}), ([1], {"lr": 1e-2, "weight_decay": 0.0})]
    params, moms, optimizer = run(lambda gs: Lion(gs, lr=1e-3, betas=(0.9, 0.99), impl=impl), groups_spec, grads)
    assert optimizer.impl == impl

    torch.manual_seed(0)
    ref_p = [torch.randn(s) for s in SHAPES]
    ref_m = [torch.zeros(s) for s in SHAPES]
    hyper = {0: (3e-2, 0.5), 2: (3e-2, 0.5), 1: (1e-2, 0.0)}
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            paper_lion(ref_p[i], g, ref_m[i], *hyper[i], 0.9, 0.99)
    for i in range(len(SHAPES)):
        assert torch.equal(params[i], ref_p[i]), f"param {i} differs from the paper's rule"
        assert torch.equal(moms[i], ref_m[i]), f"momentum {i} differs from the paper's rule"

    peer, _, _ = run(lambda gs: lion_pytorch.Lion(gs, lr=1e-3, betas=(0.9, 0.99)), groups_spec, grads)
    for i in range(len(SHAPES)):
        assert torch.equal(params[i], peer[i]), f"param {i} differs from lion-pytorch"


def test_lion_on_flat_shards_and_named_state():
    """ZeRO-1 hands Lion flat 1-D fp32 pieces (plain tensors with .grad): same numbers as whole tensors."""
    torch.manual_seed(2)
    whole = torch.nn.Parameter(torch.randn(30, 20))
    flat = torch.nn.Parameter(whole.detach().reshape(-1).clone())
    a = Lion([whole], lr=1e-2, weight_decay=0.1, impl="compiled")
    b = Lion([flat], lr=1e-2, weight_decay=0.1, impl="compiled")
    for _ in range(3):
        g = torch.randn(30, 20)
        whole.grad, flat.grad = g.clone(), g.reshape(-1).clone()
        a.step()
        b.step()
    assert torch.equal(whole.detach().reshape(-1), flat.detach())
    state = named_state(a, {"w": whole})
    assert set(state["w"]) == {"exp_avg"} and state["w"]["exp_avg"].shape == (30, 20)
    fresh = Lion([torch.nn.Parameter(whole.detach().clone())], lr=1e-2, impl="foreach")
    load_named_state(fresh, {"w": fresh.param_groups[0]["params"][0]}, state)
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"], a.state[whole]["exp_avg"])


def test_deepspeed_impl_falls_back_when_the_op_cannot_build(monkeypatch, caplog):
    from deepspeed.ops import op_builder

    def no_build(self, *args, **kwargs):
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(op_builder.CPULionBuilder, "load", no_build)
    with caplog.at_level(logging.INFO, logger="plait"):
        optimizer = Lion([torch.nn.Parameter(torch.ones(4))], lr=0.1, impl="deepspeed")
    assert optimizer.impl in ("compiled", "foreach")
    assert "DeepSpeed op unavailable" in caplog.text
    with pytest.raises(ValueError, match="optim.impl"):
        Lion([torch.nn.Parameter(torch.ones(4))], impl="fastest")


def test_adamw_with_a_lion_kernel_says_so_in_one_line(caplog):
    from plait.optim.builder import build_optimizer
    from plait.optim.config import OptimConfig

    with caplog.at_level(logging.INFO, logger="plait"):
        optimizer = build_optimizer({"w": torch.nn.Parameter(torch.ones(4))}, OptimConfig(impl="deepspeed"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    lines = [line for line in caplog.text.splitlines() if "optim.impl=deepspeed" in line]
    assert len(lines) == 1 and "fused AdamW" in lines[0]


def _paper_reference(starts, grads, hyper):
    """The paper's rule over per-step grads, one tensor at a time: (params, momenta)."""
    params = [s.clone() for s in starts]
    moms = [torch.zeros_like(s) for s in starts]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            paper_lion(params[i], g, moms[i], *hyper[i], 0.9, 0.99)
    return params, moms


def test_triton_kernel_equals_paper_rule_bitwise(monkeypatch):
    """The multi-tensor Triton kernel (run by Triton's interpreter on CPU tensors) is the paper's rule,
    bit for bit: many tensors of odd sizes across block edges, two groups with and without weight decay,
    unaligned views into one flat buffer (ZeRO-1's pieces), and a NaN gradient (torch.sign(NaN) is 0: the
    parameter takes no step, the momentum turns NaN, as in eager)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(3)
    sizes = [1, 3, 4095, 4096, 4097, 9000] + [int(n) for n in torch.randint(1, 300, (34,))]
    flat = torch.randn(sum(sizes) + 1)[1:]  # offset by one element: no view is 16-byte aligned
    starts = list(flat.split(sizes))
    tensors = [s.clone() for s in starts[:20]] + [s.detach() for s in flat.clone().split(sizes)[20:]]
    for t in tensors:
        t.requires_grad_(True)
    grads = [[torch.randn(n) for n in sizes] for _ in range(STEPS)]
    grads[2][7][5] = float("nan")
    hyper = {i: (3e-2, 0.5) if i % 2 == 0 else (1e-2, 0.0) for i in range(len(sizes))}
    groups = [{"params": tensors[0::2], "lr": 3e-2, "weight_decay": 0.5},
              {"params": tensors[1::2], "lr": 1e-2, "weight_decay": 0.0}]
    optimizer = Lion(groups, lr=1e-3, betas=(0.9, 0.99), impl="triton")
    assert optimizer.impl == "triton"
    grad_buffer = torch.zeros(sum(sizes) + 1)[1:]  # grads as views of one flat buffer, as plait keeps them
    for t, view in zip(tensors, grad_buffer.split(sizes)):
        t.grad = view
    for step_grads in grads:
        for t, g in zip(tensors, step_grads):
            t.grad.copy_(g)
        optimizer.step()
    ref_p, ref_m = _paper_reference(starts, grads, hyper)
    for i in range(len(sizes)):
        assert torch.equal(tensors[i].detach(), ref_p[i]), f"param {i} (size {sizes[i]}) differs"
        assert torch.equal(optimizer.state[tensors[i]]["exp_avg"].nan_to_num(7.0), ref_m[i].nan_to_num(7.0))
    assert optimizer.state[tensors[7]]["exp_avg"][5].isnan() and not tensors[7].detach().isnan().any()
    kernel = optimizer._kernel
    assert len(kernel._tables) == 2 and not any(t.aligned for t in kernel._tables.values())


def test_triton_impl_without_triton_falls_back_in_one_line(monkeypatch, caplog):
    """No CUDA and no interpreter: asking for the Triton kernel says why in the log and steps with another."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("Triton runs here")
    with caplog.at_level(logging.INFO, logger="plait"):
        optimizer = Lion([torch.nn.Parameter(torch.ones(4))], lr=0.1, impl="triton")
    assert optimizer.impl in ("compiled", "foreach")
    assert "Triton kernel unavailable" in caplog.text
