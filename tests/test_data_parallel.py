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


def _zero1_state_for_writers(rank, world):
    """ZeRO-1 over dp=2 with 1 KiB buckets, one AdamW step: (this rank's state with `dest`, every parameter's whole
    state, the largest tensor one of named_state's collectives moved, the largest bucket, the bucket count)."""
    import torch
    import torch.distributed as dist

    from plait.common import collectives
    from plait.optim.builder import make_optimizer
    from plait.optim.config import OptimConfig
    from plait.optim.groups import param_groups
    from plait.parallel.config import ParallelConfig
    from plait.parallel.data_parallel import DataParallelGrads
    from plait.parallel.grid import Grid
    from plait.parallel.zero import ZeroOptimizer

    grid = Grid.build(dp=world)
    torch.manual_seed(0)
    module = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(4)))
    named = dict(module.named_parameters())
    grads = DataParallelGrads([module], grid, ParallelConfig(zero=1, bucket_mb=1 / 1024), shard=True)
    cfg = OptimConfig(name="adamw", impl="foreach", lr=1e-2)
    optimizer = ZeroOptimizer(grads, grid, lambda groups: make_optimizer(groups, cfg), param_groups(named, 0.1))
    grads.start_overlap()
    module(torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))).pow(2).mean().backward()
    grads.finish()
    optimizer.step()
    moved = []
    for holder, name in ((dist, "gather"), (dist, "all_reduce"), (collectives, "all_gather_tensor")):
        original = getattr(holder, name)
        setattr(holder, name, lambda tensor, *args, original=original, **kwargs:
                (moved.append(tensor.numel()), original(tensor, *args, **kwargs))[1])
    dest = {name: index % world for index, name in enumerate(named)}  # the writers alternate
    mine = optimizer.named_state(dest)
    whole = optimizer.named_state()
    buckets = grads.chunks[0].buckets
    to_numpy = lambda state: {n: {k: v.numpy() for k, v in entry.items()} for n, entry in state.items()}  # noqa: E731
    return to_numpy(mine), to_numpy(whole), max(moved), max(b.size for b in buckets), len(buckets), dest


def test_zero1_named_state_gathers_bucket_by_bucket_to_the_writers():
    """Each rank gets exactly the state of the parameters it writes, equal to the state gathered everywhere, and no
    collective on the way moves more than one bucket (not the whole state: a rank never holds all of it)."""
    for rank, (mine, whole, moved, bucket, buckets, dest) in enumerate(run_ranks(2, _zero1_state_for_writers)):
        assert buckets >= 4
        assert sorted(mine) == sorted(name for name, writer in dest.items() if writer == rank)
        for name, entry in mine.items():
            assert entry.keys() == whole[name].keys() == {"exp_avg", "exp_avg_sq", "step"}
            assert all((entry[key] == whole[name][key]).all() for key in entry), name
        assert moved <= bucket


class _LateGather:
    """An all-gather whose result lands only when waited for (the worst a real one may do): a forward that read
    its weights before waiting would read the previous step's."""

    def __init__(self, output, whole):
        self.output, self.whole = output, whole

    def wait(self):
        self.output.copy_(self.whole)
        return True


def _overlapped_gathers(rank, world, run_dir, cache):
    """pp2 x dp2 ZeRO-1 with tiny buckets, gathers that land late: (losses, norms, val loss, final weights) with
    the gathers waited after each step, overlapped with the next forward, and overlapped with the waits removed;
    and how many gathers were left in flight after a step."""
    import torch

    from plait.common import collectives
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    real = collectives.all_gather_tensor

    def late(output, tensor, group=None, async_op=False):
        if not async_op:
            return real(output, tensor, group=group)
        whole = torch.empty_like(output)
        real(whole, tensor, group=group)
        return _LateGather(output, whole)

    collectives.all_gather_tensor = late
    outcomes = {}
    for case in ("waited", "overlapped", "unhooked"):
        overlap = "true" if case != "waited" else "false"
        cfg = load_config(BASE + ["parallel.pp=2", "parallel.microbatches=2", "parallel.zero=1",
                                  "parallel.bucket_mb=0.02", f"parallel.overlap_param_gather={overlap}",
                                  "train.eval_batches=2", f"train.run_dir={run_dir}/{case}", f"data.cache_dir={cache}"])
        trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
        if case == "unhooked":
            for handle in trainer.optimizer.hooks:
                handle.remove()
        records, in_flight = [], 0
        for step in range(4):
            records.append(trainer.step())
            in_flight = max(in_flight, sum(len(chunk.param_gathers) for chunk in trainer.grads.chunks))
            if step == 1:
                trainer.save_checkpoint()  # reads the weights whole: waits for the gathers
        val = trainer.evaluate()
        weights = {name: p.detach().clone() for name, p in trainer.grads.full_params().items()}
        trainer.close()
        outcomes[case] = ([r["loss"] for r in records], [r["grad_norm"] for r in records], val, weights, in_flight)
    return outcomes


def test_zero1_weight_gathers_overlapped_with_the_forward_equal_waited_ones(tmp_path, stdlib_tokens):
    """parallel.overlap_param_gather=true leaves each step's all-gathers in flight (one per bucket) and each module
    waits for its own bucket before its forward: with gathers that land only when waited for, the losses, grad
    norms, validation loss, a checkpoint taken mid-run and the final weights equal, bit for bit, those of gathers
    waited right after the step; with the waits removed the forwards read stale weights and the losses differ."""
    import torch

    cache = stdlib_tokens[0].parent.parent
    for outcome in run_ranks(4, _overlapped_gathers, str(tmp_path), str(cache)):
        waited, overlapped, unhooked = outcome["waited"], outcome["overlapped"], outcome["unhooked"]
        assert waited[4] == 0 and overlapped[4] >= 4  # gathers left in flight after a step, one per bucket
        assert overlapped[:3] == waited[:3]
        assert all(torch.equal(overlapped[3][name], waited[3][name]) for name in waited[3])
        assert unhooked[0][1:] != waited[0][1:]  # the test's late gathers do bite


def test_overlap_param_gather_needs_zero1():
    from plait.train.config import ConfigError, load_config, validate

    validate(load_config(["parallel.overlap_param_gather=true", "parallel.zero=1"]))
    for zero in (0, 3):
        with pytest.raises(ConfigError, match=f"but parallel.zero={zero}; set parallel.zero=1"):
            validate(load_config(["parallel.overlap_param_gather=true", f"parallel.zero={zero}"]))
