"""One trainer, a few steps, from a test: the harness the layout-parity tests share (run on gloo ranks by
`dist_utils.run_ranks`, or in this process as the one-process reference)."""

from typing import Dict, List, Optional, Sequence, Tuple


def make_trainer(rank: int, world: int, base: Sequence[str], overrides: Sequence[str], run_dir, cache):
    """A Trainer built from `base` + `overrides` (writing under `run_dir`, tokens from `cache`) on rank `rank` of
    `world` (one process at world 1)."""
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    cfg = load_config(list(base) + list(overrides) + [f"train.run_dir={run_dir}", f"data.cache_dir={cache}"])
    return Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun" if world > 1 else "single"))


def train_steps(rank: int, world: int, base: Sequence[str], overrides: Sequence[str], run_dir, cache, steps: int,
                eval_batches: int = 2) -> Tuple[List[float], List[float], Optional[float]]:
    """(the losses and grad norms of `steps` steps, the validation loss over `eval_batches` batches after them (None
    for 0)) of `make_trainer`'s Trainer."""
    logged, validation = logged_steps(make_trainer(rank, world, base, overrides, run_dir, cache), steps,
                                      eval_batches=eval_batches)
    return logged["loss"], logged["grad_norm"], validation


def logged_steps(trainer, steps: int, keys: Sequence[str] = ("loss", "grad_norm"), save: bool = False,
                 eval_batches: Optional[int] = None) -> Tuple[Dict[str, list], Optional[float]]:
    """({key: each step's logged value (None where a step logs none)} of `steps` steps, the validation loss after
    them over `eval_batches` batches (None: `train.eval_batches`; 0: none, None returned)) of `trainer`, which is
    closed after; with `save`, a checkpoint is written before the validation."""
    try:
        records = [trainer.step() for _ in range(steps)]
        if save:
            trainer.save_checkpoint()
        validation = None if eval_batches == 0 else trainer.evaluate(eval_batches)
        return {key: [r.get(key) for r in records] for key in keys}, validation
    finally:
        trainer.close()
