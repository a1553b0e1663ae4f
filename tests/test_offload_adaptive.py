"""keep_last=auto: offload the prefix of blocks whose copies the link finishes while the forward runs.

The plan is arithmetic on a profiled forward (block times, saved bytes) and a measured
bandwidth, so it is tested on exact numbers; the integration test runs the real profile on
CPU and checks the plan is applied, reported, and leaves gradients bitwise unchanged.
"""

import logging

import pytest
import torch

from plait.offload.adaptive import BlockProfile, plan_offload
from plait.offload.config import OffloadError, layer_modes, validate_offload
from plait.train.build import build_model
from tests.offload_utils import TINY, attach, batch, forward_backward, grads, offload_config

MB = 10**6
BLOCKS = [BlockProfile(0.010, 100 * MB) for _ in range(8)]  # 8 blocks of 10 ms saving 100 MB each


def test_fast_link_offloads_every_block_but_the_last():
    plan = plan_offload(BLOCKS, bandwidth=50e9)  # 2 ms a block's copy
    assert plan.offloaded_blocks == 7 and plan.planned_bytes == 700 * MB
    assert plan.bound_bytes == 700 * MB and plan.reached == 1.0  # capped at what the first 7 blocks save


def test_link_bound_plan_reaches_the_bound():
    plan = plan_offload(BLOCKS, bandwidth=5e9)  # 20 ms a block's copy, 80 ms of forward: 400 MB can move
    assert plan.bound_bytes == 400 * MB
    assert plan.offloaded_blocks == 4 and plan.planned_bytes == 400 * MB and plan.reached >= 0.8
    uneven = [BlockProfile(0.004, 10 * MB), BlockProfile(0.030, 300 * MB), BlockProfile(0.010, 10 * MB),
              BlockProfile(0.010, 10 * MB)]
    plan = plan_offload(uneven, bandwidth=8e9)  # block 1's 300 MB take 37.5 ms, done at 41.5 of 54 ms
    assert plan.offloaded_blocks == 3 and plan.planned_bytes == 320 * MB


def test_slow_link_keeps_everything():
    plan = plan_offload(BLOCKS, bandwidth=1e9)  # 100 ms for one block's copy: none finishes in time
    assert plan.offloaded_blocks == 0 and plan.planned_bytes == 0 and plan.reached == 0.0


def test_keep_last_setting():
    validate_offload(offload_config("host", None, keep_last="auto"))
    validate_offload(offload_config("host", None, keep_last=3))
    assert layer_modes(offload_config("host", None, keep_last="auto"), 4) == ["offload"] * 3 + ["keep"]
    for bad in ("sometimes", -1, True):
        with pytest.raises(OffloadError, match="offload.keep_last"):
            validate_offload(offload_config("host", None, keep_last=bad))


@pytest.mark.parametrize("bandwidth,offloaded", [(1e15, 3), (1e3, 0)], ids=["fast", "slow"])
def test_profiled_step_sets_the_plan_and_keeps_gradients(bandwidth, offloaded, caplog):
    torch.manual_seed(0)
    tokens = batch()
    reference = build_model(TINY, seed=0)
    expected = [None, None]
    for step in range(2):
        reference.zero_grad()
        forward_backward(reference, tokens)
        expected[step] = grads(reference)
    model = build_model(TINY, seed=0)
    offload = attach(model, offload_config("host", None, keep_last="auto"))
    assert offload.adaptive and offload.bandwidth > 0
    offload.bandwidth = bandwidth  # the measured figure, replaced to force each branch
    with caplog.at_level(logging.INFO, logger="plait"):
        for step in range(2):
            model.zero_grad()
            metrics = forward_backward(model, tokens, offload=offload)
            assert all(torch.equal(g, expected[step][n]) for n, g in grads(model).items())
            if step == 0:
                assert offload.chunk_modes == [["offload"] * offloaded + ["keep"] * (4 - offloaded)]
                assert metrics["offload_blocks_offloaded"] == offloaded
                assert metrics["offload_bound_bytes"] > 0 and metrics["offload_link_bytes_per_s"] == bandwidth
            else:
                written = metrics["offload_written_bytes"] + metrics["offload_from_memory_bytes"]
                assert (written > 0) == (offloaded > 0)
    assert caplog.text.count("keep_last=auto: offload") == 1
    offload.close()
