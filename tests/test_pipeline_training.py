"""The trainer under pipeline parallelism: pp=2 (interleaved vpp=2, and 1F1B) on 2 gloo ranks,
and tp=2 (sequence parallel) x pp=2 on 4, train with the same per-step losses, grad norms and
validation loss as one process.

fp32, dropout-free, 8 micro-batches per step; the loss the trainer logs comes from the last
stage and is broadcast over the pp group, so every rank must report the same numbers.
"""

import pytest

from tests.dist_utils import run_ranks

STEPS = 4
TOL = 1e-5
# (parallel.schedule, parallel.vpp): interleaved, plain 1F1B, and the zero-bubble ones (the V schedules read
# vpp=1 as their two chunks); zbh1 with activation offload to host memory (its I and W both unpack)
PIPELINES = [("1f1b", 2), ("1f1b", 1), ("zbh1", 1), ("zbv", 1), ("dualpipev", 1), ("zbh1+offload", 1)]


def overrides(run_dir, cache, pp=1, vpp=1, schedule="1f1b"):
    return ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=256",
            "train.seq_len=16", "train.batch_size=8", f"train.steps={STEPS}", "train.eval_every=0",
            "train.eval_batches=2", "train.log_every=1", "train.progress=false", "train.peak_flops=1e10",
            f"train.run_dir={run_dir}", f"data.cache_dir={cache}", "checkpoint.save_final=false",
            f"parallel.pp={pp}", f"parallel.vpp={vpp}", f"parallel.schedule={schedule}", "parallel.microbatches=8"]


def train(trainer):
    try:
        records = [trainer.step() for _ in range(STEPS)]
        return [r["loss"] for r in records], [r["grad_norm"] for r in records], trainer.evaluate()
    finally:
        trainer.close()


def pipeline_worker(rank, world, tmp, cache):
    from plait.launch.env import ProcessEnv
    from plait.parallel.pipeline.schedule import chunks_per_rank
    from plait.train import Trainer, load_config

    results = []
    for case, vpp in PIPELINES:
        schedule, _, offload = case.partition("+")
        extra = ["offload.backend=host", "offload.min_bytes=0", "offload.device_filter=all",
                 "offload.keep_last=0"] if offload else []
        cfg = load_config(overrides(f"{tmp}/pp{world}-{case}-v{vpp}", cache, world, vpp, schedule) + extra)
        trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
        assert trainer.grid.pp == world and len(trainer.chunks) == chunks_per_rank(trainer.schedule, vpp)
        results.append(train(trainer))
        if offload:
            assert trainer.offload.cache.stats.offloaded_bytes > 0
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    from plait.train import Trainer, load_config

    cache = stdlib_tokens[0].parent.parent
    result = train(Trainer(load_config(overrides(tmp_path_factory.mktemp("pp1"), cache))))
    assert result[0][-1] < result[0][0]  # it trains
    return result, cache


def check(result, expected, label):
    losses, norms, val = result
    ref_losses, ref_norms, ref_val = expected
    assert losses == pytest.approx(ref_losses, rel=TOL), label
    assert norms == pytest.approx(ref_norms, rel=TOL), label
    assert val == pytest.approx(ref_val, rel=TOL), label


def test_pipeline_training_matches_one_process(tmp_path, reference):
    expected, cache = reference
    results = run_ranks(2, pipeline_worker, str(tmp_path), str(cache))
    for index, case in enumerate(PIPELINES):
        for rank in range(2):
            check(results[rank][index], expected, (case, rank))


def tp_pp_worker(rank, world, tmp, cache):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    cfg = load_config(overrides(f"{tmp}/tp2-pp2", cache, 2, 2) + ["parallel.tp=2", "parallel.sequence_parallel=true"])
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
    assert (trainer.grid.tp, trainer.grid.pp) == (2, 2)
    return train(trainer)


def test_tensor_and_pipeline_parallel_training_matches_one_process(tmp_path, reference):
    """tp=2 with sequence parallelism inside each of 2 interleaved stages: hidden states travel as [b, s/2, dim]."""
    expected, cache = reference
    for rank, result in enumerate(run_ranks(4, tp_pp_worker, str(tmp_path), str(cache))):
        check(result, expected, rank)


def zero_bubble_grid_worker(rank, world, tmp, cache):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    settings = [o for o in overrides(f"{tmp}/tp2-pp2-dp2-zbv", cache, 2, 1, "zbv") if "microbatches" not in o]
    cfg = load_config(settings + ["parallel.microbatches=4", "parallel.tp=2", "parallel.sequence_parallel=true",
                                  "parallel.zero=1"])  # the same 8 sequences a step: 2 dp ranks x 4 micro-batches
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
    assert (trainer.grid.tp, trainer.grid.pp, trainer.grid.dp, len(trainer.chunks)) == (2, 2, 2, 2)
    return train(trainer)


def test_zero_bubble_on_tensor_pipeline_and_data_parallel_matches_one_process(tmp_path, reference):
    """ZB-V (two chunks per rank in a V, backwards split in I and W) on tp=2 (sequence parallel) x pp=2 x
    dp=2 with ZeRO-1, 8 ranks: the data-parallel reduction starts before each chunk's last W."""
    expected, cache = reference
    for rank, result in enumerate(run_ranks(8, zero_bubble_grid_worker, str(tmp_path), str(cache))):
        check(result, expected, rank)
