"""Data parallelism, ZeRO-1 and their composition with tp (and pp) against one process.

Every layout trains the same tiny model on the same global batch of real text for 10
steps; losses and gradient norms must equal the single-process run (fp32, rel 1e-5).
"""

import pytest

from dist_utils import run_ranks

STEPS = 10
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=128", "train.seq_len=32",
        "train.batch_size=16", "train.progress=false", "train.peak_flops=1e10", "optim.warmup_steps=2",
        "optim.lr=1e-3", "train.eval_every=0", "checkpoint.save_final=false"]


def _train(rank, world, overrides, run_dir, cache):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    cfg = load_config(BASE + list(overrides) + [f"train.run_dir={run_dir}", f"data.cache_dir={cache}"])
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun" if world > 1 else "single"))
    records = [trainer.step() for _ in range(STEPS)]
    return [r["loss"] for r in records], [r["grad_norm"] for r in records], records[-1]["optimizer_bytes"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    return _train(0, 1, [], tmp_path_factory.mktemp("ref"), cache), cache


LAYOUTS = {
    "dp2": (2, ["parallel.overlap_grad_reduce=true", "parallel.bucket_mb=0.05"]),
    "tp2-pp2-vpp2-dp2-zero1": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.vpp=2", "parallel.microbatches=4",
                                   "parallel.zero=1", "parallel.bucket_mb=0.05"]),
    "tp2-dp4": (8, ["parallel.tp=2", "parallel.bucket_mb=0.05"]),
    "pp2-dp4": (8, ["parallel.pp=2", "parallel.microbatches=2"]),
    "tp2-dp2-sp-zero1-fp32avg": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=1",
                                     "parallel.average_in_collective=true"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    (ref_losses, ref_norms, _), cache = reference
    world, overrides = LAYOUTS[name]
    results = run_ranks(world, _train, overrides, tmp_path, cache)
    for losses, norms, _ in results:
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert norms == pytest.approx(ref_norms, rel=1e-5)


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_zero1_state_bytes_are_one_over_dp(dp, reference, tmp_path):
    """Each rank's optimizer state is 1/dp of the unsharded state (within 2%), and training still matches."""
    (ref_losses, _, ref_bytes), cache = reference
    results = run_ranks(dp, _train, ["parallel.zero=1", "parallel.bucket_mb=0.1"], tmp_path, cache)
    for losses, _, state_bytes in results:
        assert state_bytes == pytest.approx(ref_bytes / dp, rel=0.02)
        assert losses == pytest.approx(ref_losses, rel=1e-5)
