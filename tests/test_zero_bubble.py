"""Zero-bubble pipelines: the split backward (I then W) against the whole one, and ZB-H1, ZB-V and
DualPipeV as data (their bubbles, their memory, what the validator refuses). The runtime runs them in
tests/test_pipeline.py (every gradient against one process) and test_pipeline_training.py (the trainer)."""

import copy

import pytest
import torch

from plait.parallel.pipeline.schedule import (Action, Kind, ScheduleError, build_schedule, check_microbatches,
                                              placement)
from plait.parallel.pipeline.simulate import peak_live_microbatches, simulate, validate
from plait.parallel.pipeline.split_backward import backward_input, backward_weight


def timeline(name, pp, m, vpp=1):
    actions = build_schedule(name, pp, vpp, m)
    validate(actions, pp, vpp, m, style=placement(name))
    return actions, simulate(actions, forward=1, backward=2, weight=1)  # F = I = W = 1 (the paper's F = B = W)


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
def test_zb_h1_has_a_third_of_one_f_one_b_bubble_at_its_memory(pp, rounds):
    """m >= p (with fewer micro-batches than stages the deferred W's cannot fill the drain)."""
    m = pp * rounds + (rounds == 3)  # p, 2p, 3p + 1, 4p
    actions, zb = timeline("zbh1", pp, m)
    plain, one_f_one_b = timeline("1f1b", pp, m)
    assert zb.bubble_fraction <= one_f_one_b.bubble_fraction / 3 + 1e-12, (zb.bubble_fraction, one_f_one_b.bubble_fraction)
    assert zb.bubble_fraction == pytest.approx((pp - 1) / (3 * m))  # (p-1)(F+B-W) over m(F+B+W)
    # forwards waiting for their input grad: 1F1B's on every rank; waiting for their weight grads: 1F1B's peak
    assert [peak_live_microbatches(a, until="input") for a in actions] == [peak_live_microbatches(a) for a in plain]
    assert max(peak_live_microbatches(a) for a in actions) == max(peak_live_microbatches(a) for a in plain)


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("m", [8, 16, 32])
def test_zb_v_bubble_and_memory(pp, m):
    """ZB-V with F = I = W: (p-1) units of idle time in 6m (paper section 6: the V's warm-up and cool-down
    each leave about half a unit per stage), for m >= 2p - 1; the activations of 1F1B (p micro-batches,
    2p half-size chunk-forwards) on every rank, against interleaved 1F1B's more."""
    if m < 2 * pp - 1:
        pytest.skip("the bound holds once the V is full")
    actions, zb = timeline("zbv", pp, m, vpp=2)
    _, interleaved = timeline("interleaved", pp, m, vpp=2)
    assert zb.bubble_fraction <= (pp - 1) / (6 * m) + 1e-12, zb.bubble_fraction
    assert zb.bubble_fraction < interleaved.bubble_fraction / 2
    assert [peak_live_microbatches(a) for a in actions] == [2 * pp] * pp
    validate(actions, pp, 2, m, style="v", max_live=2 * pp)  # the memory bound, checked by the validator


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_dualpipe_v_runs_and_beats_interleaved(pp, m):
    actions, dual = timeline("dualpipev", pp, m, vpp=2)
    _, interleaved = timeline("interleaved", pp, m, vpp=2)
    assert dual.bubble_fraction < interleaved.bubble_fraction
    kinds = {a.kind for rank in actions for a in rank}
    assert {Kind.B, Kind.I, Kind.W} <= kinds  # whole backwards in the middle, split ones at the ends


def test_v_placement_hands_the_turn_over_without_a_message():
    actions = build_schedule("zbv", 4, 2, 8)
    turn = [a for a in actions[3] if a.kind in (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B)]
    assert all(a.stage != 3 or a.kind in (Kind.RECV_F, Kind.SEND_B) for a in turn)  # stage 3 -> 4 stays on rank 3
    assert {a.stage for a in actions[0] if a.kind == Kind.F} == {0, 7}  # the embedding and the loss on rank 0


def test_validator_rejects_a_weight_half_before_its_input_half():
    actions = build_schedule("zbh1", 2, 1, 4)
    rank = actions[1]
    i, w = rank.index(Action(Kind.I, 0, 1)), rank.index(Action(Kind.W, 0, 1))
    rank[i], rank[w] = rank[w], rank[i]
    with pytest.raises(ScheduleError, match="before its input-grad half"):
        validate(actions, 2, 1, 4)


def test_validator_rejects_a_missing_weight_half_and_a_broken_bound():
    actions = build_schedule("zbh1", 2, 1, 4)
    actions[0] = [a for a in actions[0] if a != Action(Kind.W, 3, 0)]
    with pytest.raises(ScheduleError, match="W3s0 appears 0 times"):
        validate(actions, 2, 1, 4)
    with pytest.raises(ScheduleError, match="rank 0 holds 4 micro-batches"):
        validate(build_schedule("gpipe", 2, 1, 4), 2, 1, 4, max_live=2)


def test_microbatch_counts_and_chunks_refused_in_one_sentence():
    with pytest.raises(ScheduleError, match="dualpipev needs parallel.microbatches=6 to be at least 2 x parallel.pp = 8"):
        check_microbatches("dualpipev", 4, 2, 6)
    with pytest.raises(ScheduleError, match="zbv schedule runs two chunks per rank"):
        check_microbatches("zbv", 4, 3, 8)
    with pytest.raises(ScheduleError, match="zbh1 schedule runs one chunk per rank"):
        check_microbatches("zbh1", 4, 2, 8)


class Block(torch.nn.Module):
    """Linears, a norm, a weight used twice side by side (`down`) and one used twice in a row with a norm between
    (`mix`, as multi-token prediction's embedding at each depth): the split must find every parameter's boundary,
    and W must not walk from one use of `mix` down to the other through the norm's node, which its own W needs."""

    def __init__(self):
        super().__init__()
        self.mix, self.between = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.norm, self.scale = torch.nn.LayerNorm(16), torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        x = self.mix(self.between(self.mix(x)))
        h = self.norm(torch.nn.functional.gelu(self.up(x)))
        return self.down(h) * self.scale + x + self.down(torch.tanh(h))


@pytest.mark.parametrize("weights", ["named", "found"])
@pytest.mark.parametrize("with_input", [True, False])
def test_split_backward_equals_the_whole_one_bitwise(with_input, weights):
    """Three micro-batches: all three I's first, then the three W's (a zero-bubble order), against whole
    backwards; the input grads and the accumulated weight grads are equal bit for bit (fp32). The weights are
    named by the caller, or found as the graph's leaves (the pipeline's way)."""
    torch.manual_seed(0)
    split, whole = Block(), None
    whole = copy.deepcopy(split)
    pending = []
    for _ in range(3):
        x = torch.randn(4, 8, requires_grad=with_input)
        grad = torch.randn(4, 8)
        x_whole = x.detach().clone().requires_grad_(with_input)
        whole(x_whole).backward(grad)
        pending.append(backward_input(split(x), grad, [x], list(split.parameters()) if weights == "named" else None))
        if with_input:
            assert torch.equal(x.grad, x_whole.grad)
        assert all(p.grad is None for p in split.parameters())  # no weight grad before W
    for item in pending:
        backward_weight(item)
    for (name, p), q in zip(split.named_parameters(), whole.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_schedule_tool_draws_zero_bubble_schedules(tmp_path, capsys):
    from plait.parallel.pipeline.cli import main

    out = tmp_path / "zbv.png"
    assert main(["--schedule", "zbv", "--pp", "4", "--microbatches", "8", "--weight", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zbv: p=4 v=2 m=8" in printed and "bubble 0.0625" in printed and "7Aw" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--schedule", "zbh1", "--pp", "4", "--microbatches", "8", "--weight", "1", "--no-png"]) == 0
    assert "bubble 0.1250 (theory 0.1250)" in capsys.readouterr().out
    assert main(["--schedule", "dualpipev", "--pp", "4", "--microbatches", "4", "--no-png"]) == 2
    assert "at least 2 x parallel.pp = 8" in capsys.readouterr().err
