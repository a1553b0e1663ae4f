"""`train.rampup_batch_size=[start, increment, samples]`: the global batch grows as Megatron's does, the run
reads the sample stream in order with no sample skipped or read twice, any layout matches one process, and a
run resumed inside the ramp is exact."""

import pytest
import torch

from dist_utils import run_ranks
from plait.data.rampup import BatchRamp
from plait.train.config import ConfigError, load_config, validate

STEPS = 8
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=128", "train.seq_len=32",
        "train.batch_size=16", "train.progress=false", "train.peak_flops=1e10", "optim.warmup_steps=2",
        "optim.lr=1e-3", "train.eval_every=0", "checkpoint.save_final=false", "train.rampup_batch_size=[4,4,40]",
        "parallel.microbatches=4"]


def megatron_batches(start, increment, samples, final, steps):
    """Megatron's RampupBatchsizeNumMicroBatchesCalculator, stepped: (consumed before each step, its batch)."""
    per_increment = samples / ((final - start) // increment)
    consumed, out = 0, []
    for _ in range(steps):
        batch = final if consumed > samples else min(start + int(consumed / per_increment) * increment, final)
        out.append((consumed, batch))
        consumed += batch
    return out


@pytest.mark.parametrize("start, increment, samples, final", [(4, 4, 40, 16), (32, 32, 10_000, 1024),
                                                              (8, 8, 7, 64), (16, 48, 500, 256), (2, 2, 1, 4)])
def test_the_batch_follows_megatrons_rule_step_by_step(start, increment, samples, final):
    ramp = BatchRamp(start, increment, samples, final)
    expected = megatron_batches(start, increment, samples, final, ramp.ramp_steps + 20)
    assert [ramp.at(step) for step in range(len(expected))] == expected
    assert ramp.at(ramp.ramp_steps)[1] == final and ramp.at(ramp.ramp_steps - 1)[1] < final


def test_the_ramp_reads_every_sample_once_in_order_on_every_dp_rank(stdlib_tokens):
    from plait.data.loader import Loader

    train, val = stdlib_tokens
    ramp = BatchRamp(4, 4, 40, 16)
    loaders = [Loader(train, val, 32, 16, 4, dp_rank=rank, dp_size=2, seed=3, ramp=ramp) for rank in range(2)]
    plain = Loader(train, val, 32, 16, 4, seed=3)
    rows, sizes = [], []
    for step in range(ramp.ramp_steps + 2):
        parts = [loader.batch(step) for loader in loaders]  # [m, micro 2, 33] each, m growing with the batch
        assert parts[0].shape[1] == 2 and parts[0].shape == parts[1].shape
        sizes.append(2 * parts[0].shape[0] * 2)
        rows += [part.reshape(-1, 33) for part in parts]
    read = torch.cat(rows)
    assert sizes == [ramp.at(step)[1] for step in range(len(sizes))] and sizes[0] == 4 and sizes[-1] == 16
    stream = torch.cat([plain.batch(step).reshape(-1, 33) for step in range(-(-len(read) // 16))])
    assert torch.equal(read, stream[:len(read)])  # the positions a run without a ramp reads, in its order
    assert torch.equal(loaders[0].val_batch(1), Loader(train, val, 32, 16, 4, dp_rank=0, dp_size=2,
                                                       seed=3).val_batch(1))  # validation batches do not ramp
    for loader in loaders + [plain]:
        loader.close()


def _train(rank, world, overrides, run_dir, cache, steps=STEPS):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer

    cfg = load_config(BASE + list(overrides) + [f"train.run_dir={run_dir}", f"data.cache_dir={cache}"])
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun" if world > 1 else "single"))
    records = [trainer.step() for _ in range(steps)]
    return [r["loss"] for r in records], [r["grad_norm"] for r in records], [r.get("batch_size") for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    return _train(0, 1, [], tmp_path_factory.mktemp("ref"), cache), cache


def test_one_process_ramps_and_its_first_step_is_a_plain_step_of_the_first_size(reference, tmp_path):
    (losses, _, sizes), cache = reference
    assert sizes == [4, 4, 4, 4, 8, 8, 12, 16]  # a level each 40 / 3 samples: consumed 0..12, 16..24, 32, 44
    first = _train(0, 1, ["train.rampup_batch_size=null", "train.batch_size=4", "parallel.microbatches=1"],
                   tmp_path, cache, steps=1)
    assert first[0][0] == pytest.approx(losses[0], rel=1e-6)  # the same 4 sequences, the same weights


LAYOUTS = {
    "pp2-dp2-interleaved-zero1": ["parallel.pp=2", "parallel.vpp=2", "parallel.zero=1"],
    "tp2-dp2": ["parallel.tp=2"],
    "pp2-zbv-dp2-zero3": ["parallel.pp=2", "parallel.schedule=zbv", "parallel.zero=3"],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_one_process_through_the_ramp(name, reference, tmp_path):
    (ref_losses, ref_norms, ref_sizes), cache = reference
    for losses, norms, sizes in run_ranks(4, _train, LAYOUTS[name], tmp_path, cache):
        assert sizes == ref_sizes
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert norms == pytest.approx(ref_norms, rel=1e-5)


def test_a_run_resumed_inside_the_ramp_is_exact(reference, tmp_path):
    from plait.train import Trainer

    (ref_losses, _, _), cache = reference
    common = BASE + [f"train.run_dir={tmp_path}", f"data.cache_dir={cache}"]  # as the reference: the LR follows
    first = Trainer(load_config(common + ["checkpoint.every=4"]))
    [first.step() for _ in range(4)]
    first.save_checkpoint()
    first.close()
    resumed = Trainer(load_config(common + ["train.resume=auto"]))
    assert resumed.step_num == 4
    losses = [resumed.step()["loss"] for _ in range(STEPS - 4)]
    assert losses == ref_losses[4:]
    resumed.close()
    with pytest.raises(Exception, match=r"ramped its batch as train.rampup_batch_size=\[4, 4, 40\] but this one "
                                        r"sets \[4, 4, 80\]; resume with train.rampup_batch_size=\[4, 4, 40\]"):
        Trainer(load_config(common + ["train.resume=auto", "train.rampup_batch_size=[4,4,80]"]))


@pytest.mark.parametrize("overrides, message", [
    (["train.rampup_batch_size=[16,4,40]"], "starts at 16, not below train.batch_size=16"),
    (["train.rampup_batch_size=[6,2,40]"], "start and increment must be multiples of dp x micro-batch = 1 x 4 = 4"),
    (["train.rampup_batch_size=[4,8,40]"], "train.batch_size=16 - start 4 is not a multiple of the increment 8"),
    (["train.rampup_batch_size=[4,4]"], "must be three positive integers [start, increment, samples]"),
    (["parallel.pp=2", "parallel.schedule=dualpipev", "parallel.microbatches=4"],
     "starts at 1 micro-batches per step, which the pipeline refuses: dualpipev needs"),
])
def test_bad_ramps_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError) as raised:
        validate(load_config(BASE + overrides), world_size=2 if "parallel.pp=2" in overrides else 1)
    assert message in str(raised.value) and "train.rampup_batch_size=" in str(raised.value)
