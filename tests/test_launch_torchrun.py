"""torchrun for real: two launchers on localhost as two nodes, and a restart after a crash.

Both runs train the tiny model with tp=2 x dp=2 (4 ranks) for the same steps and seed,
so the crashed-and-restarted run must end on the two-node run's final loss (exact resume).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import free_port

pytestmark = pytest.mark.slow

STEPS = 8
TRAIN = ["parallel.tp=2", "model=tiny", f"train.steps={STEPS}", "train.batch_size=4", "train.seq_len=64",
         "train.eval_every=0", "train.log_every=1", "train.peak_flops=1e12", "train.progress=false",
         "train.threads=1"]


def launcher_env(cache: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PLAIT_CACHE=cache, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID",
                "TORCHELASTIC_RUN_ID", "PLAIT_FAULT_AT_STEP"):
        env.pop(key, None)
    return env


def losses(run_dir: Path) -> list:
    """(step, loss) in the order they were logged (a restarted run appends to the same file)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, stdlib_tokens):
    """Two `plait-launch launch=torchrun` processes (2 workers each) meeting at one c10d endpoint."""
    tmp = tmp_path_factory.mktemp("two-node")
    cache = str(Path(stdlib_tokens[0]).parent)
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "plait.train.launch_cli", "launch=torchrun", "launch.nodes=2",
               "launch.procs_per_node=2", f"launch.rdzv_endpoint={endpoint}", "launch.join_timeout_s=120",
               *TRAIN, f"data.cache_dir={cache}", f"train.run_dir={tmp / 'run'}"]
    nodes = [subprocess.Popen(command, env=launcher_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp) for _ in range(2)]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    return tmp / "run", [node.returncode for node in nodes], outputs


def test_two_node_torchrun_trains(two_node_run):
    run_dir, codes, outputs = two_node_run
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    text = "\n".join(outputs)
    # the same derived run id on both nodes, and one rank 0 that saw all 4 ranks
    assert "--nnodes=2" in text and text.count("--rdzv-id=plait-") == 2
    assert "world 4 = tp 2 x dp 2 x pp 1" in text
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))


def test_crash_at_step_5_restarts_and_matches(two_node_run, tmp_path, stdlib_tokens):
    """Rank 1 crashes once after step 5 under --max-restarts 1: torchrun restarts the round,
    every rank resumes from the step-4 checkpoint, and the losses are the uncrashed run's."""
    reference_dir, codes, _ = two_node_run
    assert codes == [0, 0]
    cache = str(Path(stdlib_tokens[0]).parent)
    env = dict(launcher_env(cache), PLAIT_FAULT_AT_STEP="5", PLAIT_FAULT_RANK="1")
    command = [sys.executable, "-m", "plait.train.launch_cli", "launch=local", "launch.procs_per_node=4",
               "launch.max_restarts=1", *TRAIN, f"data.cache_dir={cache}", f"train.run_dir={tmp_path / 'run'}",
               "train.resume=auto", "checkpoint.every=2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert "crashes on purpose" in output  # the fault fired in round 0 ...
    assert (tmp_path / "run" / "checkpoints").is_dir()
    restarted, reference = losses(tmp_path / "run"), dict(losses(reference_dir))
    # ... round 0 logged steps 1-5 and died before step 6; round 1 resumed from the step-4
    # checkpoint (not from scratch) and dropped round 0's record of step 5, which it trained again ...
    assert "step-00000004 at step 4" in output
    assert [step for step, _ in restarted] == list(range(1, STEPS + 1))
    # ... and every step, the final one included, has the uncrashed run's loss
    for step, loss in restarted:
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_zero_bubble_under_torchrun_has_the_loss_curve_of_one_process(tmp_path, stdlib_tokens):
    """`torchrun -m plait.train parallel.pp=2 parallel.schedule=zbv parallel.microbatches=8`: two ranks, each
    with two chunks in a V and every backward split in I and W, log the losses `plait-train` logs alone."""
    cache = str(Path(stdlib_tokens[0]).parent)
    settings = ["model=tiny", "train.steps=6", "train.batch_size=8", "train.seq_len=64", "train.eval_every=0",
                "train.log_every=1", "train.peak_flops=1e12", "train.progress=false", "train.threads=1",
                f"data.cache_dir={cache}", "checkpoint.save_final=false"]
    alone = [sys.executable, "-m", "plait.train", *settings, f"train.run_dir={tmp_path / 'alone'}"]
    piped = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "plait.train",
             *settings, "parallel.pp=2", "parallel.schedule=zbv", "parallel.microbatches=8",
             f"train.run_dir={tmp_path / 'zbv'}"]
    for command in (alone, piped):
        result = subprocess.run(command, env=launcher_env(cache), capture_output=True, text=True, timeout=400,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
    assert "zbv schedule, pp 2 x vpp 2, 8 micro-batches" in result.stderr + result.stdout
    expected = losses(tmp_path / "alone")
    got = losses(tmp_path / "zbv")
    assert [step for step, _ in got] == [step for step, _ in expected] == list(range(1, 7))
    for (step, loss), (_, reference) in zip(got, expected):
        assert loss == pytest.approx(reference, rel=1e-5), f"step {step}"


def test_context_parallel_under_torchrun_has_the_loss_curve_of_one_process(tmp_path, stdlib_tokens):
    """`torchrun --nproc-per-node 4 -m plait.train parallel.cp=2 parallel.tp=2 train.seq_len=2048`: each
    sequence split over 2 cp ranks (ring attention), each layer over 2 tp ranks; one process's losses."""
    cache = str(Path(stdlib_tokens[0]).parent)
    settings = ["model=tiny", "model.max_seq_len=2048", "train.steps=3", "train.batch_size=2", "train.seq_len=2048",
                "train.eval_every=0", "train.log_every=1", "train.peak_flops=1e12", "train.progress=false",
                "train.threads=1", f"data.cache_dir={cache}", "checkpoint.save_final=false"]
    alone = [sys.executable, "-m", "plait.train", *settings, f"train.run_dir={tmp_path / 'alone'}"]
    split = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "plait.train",
             *settings, "parallel.cp=2", "parallel.tp=2", f"train.run_dir={tmp_path / 'cp'}"]
    for command in (alone, split):
        result = subprocess.run(command, env=launcher_env(cache), capture_output=True, text=True, timeout=600,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
    assert "world 4 = tp 2 x cp 2 x dp 1 x pp 1" in result.stderr + result.stdout
    expected, got = losses(tmp_path / "alone"), losses(tmp_path / "cp")
    assert [step for step, _ in got] == [step for step, _ in expected] == [1, 2, 3]
    for (step, loss), (_, reference) in zip(got, expected):
        assert loss == pytest.approx(reference, rel=1e-5), f"step {step}"
