"""The launch layer without a cluster: detection, commands, sbatch scripts, errors, the
per-round store, the preemption flag and the run directory on 2 gloo ranks."""

import datetime
import os
import signal
import sys

import pytest
import torch.distributed as dist

from dist_utils import free_port, run_ranks
from plait.launch import env as env_lib
from plait.launch.submit import check_endpoint, submit_slurm
from plait.train.launch_cli import validate_and_launch as launch
from plait.launch.commands import (default_rdzv_id, local_command, sbatch_script, torchrun_command,
                                   training_overrides)
from plait.launch.config import LaunchConfig
from plait.launch.errors import LaunchError
from plait.launch.rundir import resolve_run_dir, run_dir_from_ids
from plait.launch.signals import REQUEUE_EXIT_CODE, PreemptionFlag
from plait.parallel.layout import LayoutError
from plait.train.config import ConfigError, load_config


def test_detect_torchrun_slurm_and_single():
    torchrun = env_lib.detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n0",
                               "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "abc", "TORCHELASTIC_RESTART_COUNT": "2",
                               "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size, torchrun.launcher) == (3, 1, 4, "torchrun")
    assert (torchrun.master_addr, torchrun.master_port, torchrun.run_id, torchrun.restart_count) == ("n0", 1234, "abc", 2)
    slurm = env_lib.detect({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "40017",
                            "SLURM_JOB_NODELIST": "gpu[07-09,11],cpu1"})
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.launcher) == (5, 1, 8, "slurm")
    assert slurm.master_addr in ("gpu07",)  # scontrol, when present, agrees with the pure parser
    assert slurm.master_port == 20000 + 40017 % 20000 and slurm.run_id == "40017"
    assert env_lib.detect({}) == env_lib.ProcessEnv()
    assert env_lib.expand_hostlist("gpu[07-09,11],cpu1,a[1-2]b") == ["gpu07", "gpu08", "gpu09", "gpu11", "cpu1",
                                                                     "a1b", "a2b"]


def test_world_size_must_match_layout():
    with pytest.raises(LayoutError, match=r"parallel\.tp x parallel\.pp = 4.*this torchrun run has 6"):
        env_lib.check_layout(env_lib.ProcessEnv(0, 0, 6, "torchrun"), 2, 2)
    assert env_lib.check_layout(env_lib.ProcessEnv(0, 0, 8, "torchrun"), 2, 2).dp == 2
    cfg = load_config(["launch.procs_per_node=3", "parallel.tp=2", "launch.dry_run=true"])
    with pytest.raises(ConfigError, match=r"world size 3 .*parallel\.tp.*launch\.procs_per_node=3"):
        launch(cfg, [])


def test_overrides_pass_through_and_commands():
    overrides = ["launch=torchrun", "launch.nodes=2", "+launch.x=1", "hydra.verbose=true", "parallel.tp=2",
                 "optim.lr=1e-3", "data.path='/a b'"]
    assert training_overrides(overrides) == ["parallel.tp=2", "optim.lr=1e-3", "data.path='/a b'"]
    local = local_command(LaunchConfig(procs_per_node=4, max_restarts=2), overrides)
    assert local[-6:] == ["--max-restarts=2", "-m", "plait.train", "parallel.tp=2", "optim.lr=1e-3", "data.path='/a b'"]
    assert "--standalone" in local and "--nproc-per-node=4" in local
    spec = LaunchConfig(name="torchrun", nodes=2, procs_per_node=8, rdzv_endpoint="node0:29500", join_timeout_s=90)
    command = torchrun_command(spec, overrides)
    run_id = default_rdzv_id(training_overrides(overrides), "node0:29500")
    assert command == torchrun_command(spec, list(overrides))  # every node derives the same command
    for part in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500",
                 f"--rdzv-id={run_id}", "--rdzv-conf=join_timeout=90"):
        assert part in command
    assert default_rdzv_id(["optim.lr=3e-3"], "node0:29500") != run_id
    with pytest.raises(LaunchError, match="launch.rdzv_endpoint=HOST:PORT"):
        torchrun_command(LaunchConfig(name="torchrun", nodes=2), overrides)
    with pytest.raises(LaunchError, match="launch.rdzv_endpoint=node0 is not HOST:PORT"):
        torchrun_command(LaunchConfig(name="torchrun", nodes=2, rdzv_endpoint="node0"), overrides)
    with pytest.raises(LaunchError, match="launch.nodes=2"):
        local_command(LaunchConfig(nodes=2), overrides)


def test_sbatch_script():
    spec = LaunchConfig(name="slurm", nodes=4, procs_per_node=8, gpus_per_node=8, cpus_per_task=64, time="02:00:00",
                        partition="gpu", account="proj", signal_s=300, max_restarts=1, extra_sbatch=["--qos=high"])
    script = sbatch_script(spec, ["launch=slurm", "launch.nodes=4", "model=7b", "data.path=/d/my corpus"], "/logs")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --output=/logs/%x-%j.out", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --qos=high"):
        assert line + "\n" in script, line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert '--rdzv-id="$SLURM_JOB_ID"' in script and "--nproc-per-node=8" in script and "--max-restarts=1" in script
    assert "-m plait.train model=7b 'data.path=/d/my corpus' &" in script
    assert "launch.nodes" not in script.split("-m plait.train", 1)[1]
    assert f'"$status" -eq {REQUEUE_EXIT_CODE}' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "requeue" not in sbatch_script(LaunchConfig(name="slurm", requeue=False), [], "/logs")


def test_missing_sbatch_and_unreachable_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    spec = LaunchConfig(name="slurm", output_dir=str(tmp_path / "out"))
    with pytest.raises(LaunchError, match="launch=slurm needs `sbatch` on PATH.*launch.dry_run=true"):
        submit_slurm(spec, [], 0)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
    with pytest.raises(LaunchError, match="launch.rdzv_endpoint host 'no-such-node.invalid' does not resolve"):
        check_endpoint(LaunchConfig(name="torchrun", nodes=2, rdzv_endpoint="no-such-node.invalid:29500"))
    # TEST-NET-1 (RFC 5737): routable nowhere, so the connection never answers
    with pytest.raises(LaunchError, match=r"launch.rdzv_endpoint=192.0.2.1:29500 did not answer within "
                                          r"launch.connect_timeout_s=1"):
        check_endpoint(LaunchConfig(name="torchrun", nodes=2, rdzv_endpoint="192.0.2.1:29500", connect_timeout_s=1))
    check_endpoint(LaunchConfig(name="torchrun", nodes=2, rdzv_endpoint="127.0.0.1:1"))  # this machine hosts it


def test_each_restart_round_gets_its_own_store_prefix(monkeypatch):
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # the agent (here: the test) hosts the store
    env = env_lib.ProcessEnv(1, 1, 2, "torchrun", "127.0.0.1", port)
    first = env_lib.round_store(env, datetime.timedelta(seconds=10))
    first.set("addr", "dead worker")
    second = env_lib.round_store(env, datetime.timedelta(seconds=10))  # the same rank after a restart
    second.set("addr", "new worker")
    assert server.get("plait/round1/addr") == b"dead worker"
    assert server.get("plait/round2/addr") == b"new worker"


def _flag_and_run_dir(rank, world_size):
    from plait.parallel.grid import Grid

    grid = Grid.build(2, 1)
    flag = PreemptionFlag()
    before = flag.should_stop(grid)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only raises the flag
    after = flag.should_stop(grid)
    flag.restore()
    cfg = load_config([])
    shared = str(resolve_run_dir(cfg, grid, environ={}))
    return before, after, flag.local, shared


def test_preemption_flag_agreed_and_one_run_dir():
    results = run_ranks(2, _flag_and_run_dir)
    assert [r[:3] for r in results] == [(False, True, False), (False, True, True)]
    assert results[0][3] == results[1][3] and results[0][3].startswith("outputs")
    assert str(run_dir_from_ids({"SLURM_JOB_ID": "77", "TORCHELASTIC_RUN_ID": "x"})) == "outputs/slurm-77"
    assert str(run_dir_from_ids({"TORCHELASTIC_RUN_ID": "r1"})) == "outputs/torchrun-r1"
    assert run_dir_from_ids({"TORCHELASTIC_RUN_ID": "none"}) is None


def test_multirun_sweep_gives_one_job_per_point(tmp_path):
    """`plait-launch -m` runs the app once per point, each with that point's overrides only."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", "plait.train.launch_cli", "-m", "launch=slurm", "launch.dry_run=true",
                             "launch.nodes=2", "optim.lr=1e-3,3e-3", "train.steps=5"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scripts = result.stdout.split("#!/bin/bash")[1:]
    assert len(scripts) == 2
    assert "-m plait.train optim.lr=0.001 train.steps=5 &" in scripts[0]  # hydra normalizes sweep values
    assert "-m plait.train optim.lr=0.003 train.steps=5 &" in scripts[1]
    assert all("#SBATCH --nodes=2" in script for script in scripts)
