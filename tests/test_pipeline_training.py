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
PIPELINES = [("1f1b", 2), ("1f1b", 1)]  # (parallel.schedule, parallel.vpp): interleaved, then plain 1F1B


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
    from plait.train import Trainer, load_config

    results = []
    for schedule, vpp in PIPELINES:
        cfg = load_config(overrides(f"{tmp}/pp{world}-{schedule}-v{vpp}", cache, world, vpp, schedule))
        trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
        assert trainer.grid.pp == world and len(trainer.chunks) == vpp
        results.append(train(trainer))
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
