"""Offload under tensor parallelism (tp=2) and the interleaved pipeline runtime (pp=2, vpp=2).

One spawn of 2 gloo ranks checks both: gradients with offload are bitwise equal to the
same layout without it, for each CPU backend and precision.
"""

import os
import tempfile

import torch

from tests.dist_utils import run_ranks
from tests.offload_utils import TINY, batch, forward_backward, grads, offload_config, scratch_files

CASES = [("file", "fp32"), ("file", "bf16"), ("host", "fp32")]


def tp_grads(grid, tokens, precision, cfg=None):
    from plait.offload import ActivationOffload
    from plait.train.build import build_model

    model = build_model(TINY, grid, seed=11, sequence_parallel=True)
    offload = None
    if cfg is not None:
        offload = ActivationOffload(cfg, grid)
        offload.attach(model)
    metrics = forward_backward(model, tokens, precision, offload)
    if offload is not None:
        offload.close()
    return grads(model), metrics


def pp_grads(grid, tokens, cfg=None):
    from plait.offload import ActivationOffload
    from plait.parallel.pipeline.runtime import PipelineRuntime
    from plait.train.build import build_chunks, hidden_shape, named_parameters_of

    chunks = build_chunks(TINY, grid, 2, seed=11)
    offload = None
    if cfg is not None:
        offload = ActivationOffload(cfg, grid)
        for chunk in chunks:
            offload.attach(chunk)
    runtime = PipelineRuntime(chunks, grid, schedule="interleaved", vpp=2, microbatches=tokens.shape[0],
                              hidden_shape=hidden_shape(tokens.shape[1], tokens.shape[2] - 1, TINY.dim, 1, False))
    metrics = {}
    if offload is not None:
        offload.begin_step()
    runtime.run(tokens[:, :, :-1], tokens[:, :, 1:], lambda out, target: chunks[-1].loss(out, target))
    if offload is not None:
        metrics = offload.end_step()
        offload.close()
    return {name: param.grad.clone() for name, param in named_parameters_of(chunks)}, metrics


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def offload_worker(rank, world_size, root):
    from plait.parallel.grid import Grid

    path = os.path.join(root, f"rank{rank}")
    results = {}
    grid = Grid.build(tp=2)
    tokens = batch(micro=2, seed=4)
    cases = CASES + ([("aio", "fp32")] if aio_available() else [])
    for backend, precision in cases:
        expected, _ = tp_grads(grid, tokens, precision)
        actual, metrics = tp_grads(grid, tokens, precision, offload_config(backend, path))
        results[f"tp2-{backend}-{precision}"] = (same(actual, expected), metrics["offload_written_bytes"],
                                                 metrics["offload_read_bytes"], len(scratch_files(path)))
    grid = Grid.build(pp=2)
    tokens = batch(micro=4, seed=5)
    expected, _ = pp_grads(grid, tokens)
    for backend in ["file", "host"] + (["aio"] if aio_available() else []):
        actual, metrics = pp_grads(grid, tokens, offload_config(backend, path, keep_last=0))
        results[f"pp2-vpp2-{backend}"] = (same(actual, expected), metrics["offload_written_bytes"],
                                          metrics["offload_read_bytes"], len(scratch_files(path)))
    return results


def aio_available() -> bool:
    """The DeepSpeed aio op loads (built by tests/test_offload.py, or here on first use)."""
    from plait.offload import OffloadError
    from plait.offload.aio import load_aio_op

    try:
        load_aio_op()
        return True
    except OffloadError:
        return False


def test_offload_bitwise_under_tp2_and_interleaved_pp2():
    with tempfile.TemporaryDirectory() as root:
        results = run_ranks(2, offload_worker, root)
    from tests.test_offload_dist import aio_available

    if aio_available():  # CI installs libaio-dev: the aio cases must have run there
        assert all("tp2-aio-fp32" in per_rank and "pp2-vpp2-aio" in per_rank for per_rank in results)
    for rank, per_rank in enumerate(results):
        for case, (equal, written, read, files_left) in per_rank.items():
            assert equal, f"rank {rank} {case}: gradients differ from the same layout without offload"
            assert written > 0 and read > 0, (rank, case, written, read)
            assert files_left == 0, (rank, case)
