"""`train.max_minutes` stops a run at a step boundary, checkpointed, on every rank alike (any rank's clock
decides), and the run goes on from there exactly; `train.profile_steps` writes one whole Chrome trace per
rank holding exactly the profiled steps' phases."""

import json
import signal

import pytest

from dist_utils import run_ranks
from plait.launch.signals import PreemptionFlag
from plait.train.config import ConfigError, load_config, validate

SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "train.seq_len=16",
         "train.batch_size=4", "train.eval_every=0", "train.log_every=1", "train.progress=false",
         "train.peak_flops=1e10", "optim.warmup_steps=1", "train.steps=6"]


def test_the_agreed_decision_ranks_requeue_over_time_over_ctrl_c():
    from plait.parallel.grid import Grid

    grid = Grid.single()
    cases = [(None, False, None), (signal.SIGINT, False, "interrupt"), (None, True, "time"),
             (signal.SIGINT, True, "time"), (signal.SIGTERM, True, "requeue"), (signal.SIGUSR1, False, "requeue")]
    for received, time_up, expected in cases:
        flag = PreemptionFlag(install=False)
        if received is not None:
            flag.set(received)
        if time_up:
            flag.out_of_time()
        assert flag.decision(grid) == expected, (received, time_up)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_out_of_time_checkpoints_and_the_run_goes_on_exactly(tmp_path, stdlib_tokens, caplog):
    from plait.train import Trainer

    cache = stdlib_tokens[0].parent.parent
    common = SMALL + [f"data.cache_dir={cache}"]
    Trainer(load_config(common + [f"train.run_dir={tmp_path / 'reference'}"])).fit()
    run = tmp_path / "limited"
    with caplog.at_level("INFO", logger="plait"):
        stopped = Trainer(load_config(common + [f"train.run_dir={run}", "train.max_minutes=1e-9"]))
        stopped.fit()  # returns (exit 0) after the first step, with its checkpoint
    assert stopped.step_num == 1 and sorted(losses(run)) == [1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    assert "stopping at step 1 of 6: train.max_minutes=1e-09 has passed" in caplog.text
    Trainer(load_config(common + [f"train.run_dir={run}", "train.resume=auto"])).fit()
    assert losses(run) == losses(tmp_path / "reference")  # steps 1..6, bit for bit


def _skewed_clock_and_profile(rank, world, run_dir, cache):
    """dp 2 with a generous limit that only rank 1's clock has passed; steps 1-2 profiled."""
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer

    cfg = load_config(SMALL + [f"data.cache_dir={cache}", f"train.run_dir={run_dir}", "train.max_minutes=60",
                               "train.profile_steps=[1,2]"])
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
    if rank == 1:
        trainer.started -= 3600.0  # its clock says the hour is up
    trainer.fit()
    return trainer.step_num


def test_one_ranks_clock_stops_every_rank_and_each_rank_writes_its_profile(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    assert run_ranks(2, _skewed_clock_and_profile, tmp_path, cache) == [1, 1]  # both stop after step 1
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    for rank in range(2):  # the window was cut short by the stop: step 1's phases, written whole
        trace = json.loads((tmp_path / "profile" / f"rank-{rank:05d}.json").read_text())
        names = [event.get("name") for event in trace["traceEvents"]]
        for phase in ("plait.data", "plait.forward_backward", "plait.grad_finish", "plait.optimizer"):
            assert names.count(phase) == 1, (rank, phase)
    assert not [p for p in (tmp_path / "profile").iterdir() if p.name.startswith(".tmp")]


def test_a_profile_window_holds_exactly_its_steps(tmp_path, stdlib_tokens, caplog):
    from plait.train import Trainer

    cache = stdlib_tokens[0].parent.parent
    with caplog.at_level("INFO", logger="plait"):
        Trainer(load_config(SMALL + [f"data.cache_dir={cache}", f"train.run_dir={tmp_path}",
                                     "train.profile_steps=[3,5]"])).fit()
    trace = json.loads((tmp_path / "profile" / "rank-00000.json").read_text())
    names = [event.get("name") for event in trace["traceEvents"]]
    assert names.count("plait.optimizer") == 3 and names.count("plait.forward_backward") == 3
    assert "profile of steps 3-5 (rank 0" in caplog.text and "Self CPU" in caplog.text


@pytest.mark.parametrize("override, message", [
    ("train.profile_steps=[3,2]", "train.profile_steps=[3, 2] must be [first, last] with 1 <= first <= last <= "
                                  "train.steps=6"),
    ("train.profile_steps=[0,1]", "train.profile_steps=[0, 1] must be"),
    ("train.profile_steps=[5,9]", "train.profile_steps=[5, 9] must be"),
    ("train.max_minutes=-1", "train.max_minutes=-1"),
])
def test_bad_limits_and_windows_are_one_sentence(override, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        validate(load_config(SMALL + [override]))
