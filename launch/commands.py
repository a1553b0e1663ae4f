"""A launch config as commands: the torchrun line for a node, and the sbatch script for Slurm.

Pure functions from (LaunchConfig, training overrides) to text, so every command can be
printed (`launch.dry_run=true`) and tested without a cluster. The training overrides are
the user's own Hydra overrides minus the `launch` ones, passed unchanged to
`-m plait.train`.
"""

import hashlib
import shlex
import sys
from typing import List, Optional, Sequence

from plait.launch.config import LaunchConfig
from plait.launch.errors import LaunchError
from plait.launch.signals import REQUEUE_EXIT_CODE


def is_launch_override(override: str) -> bool:
    """`launch=slurm`, `launch.nodes=2`, `+launch.x=..`, `~launch.y` and hydra's own keys stay here."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key in ("launch", "hydra") or key.startswith(("launch.", "hydra.", "hydra/"))


def training_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides that go on to the training command (everything but launch/hydra keys)."""
    return [o for o in overrides if not is_launch_override(o)]


def torchrun_prefix(launch: LaunchConfig) -> List[str]:
    """`torchrun` itself: the configured command, or this interpreter's `-m torch.distributed.run`."""
    if launch.torchrun:
        return shlex.split(launch.torchrun)
    return [sys.executable, "-m", "torch.distributed.run"]


def default_rdzv_id(overrides: Sequence[str], endpoint: str) -> str:
    """A run id every node derives alike from the same command line (no coordination needed)."""
    digest = hashlib.sha1(("\0".join(overrides) + "\0" + endpoint).encode()).hexdigest()[:10]
    return f"plait-{digest}"


def split_endpoint(endpoint: Optional[str]) -> tuple:
    """"host:port" as (host, port), or a LaunchError naming launch.rdzv_endpoint."""
    host, _, port = (endpoint or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"launch.rdzv_endpoint={endpoint} is not HOST:PORT; give the first node's address "
                          f"and a free port, e.g. launch.rdzv_endpoint=node0:29500.")
    return host, int(port)


def check_counts(launch: LaunchConfig) -> None:
    for key in ("nodes", "procs_per_node"):
        if getattr(launch, key) < 1:
            raise LaunchError(f"launch.{key}={getattr(launch, key)} must be a positive integer.")
    if launch.max_restarts < 0:
        raise LaunchError(f"launch.max_restarts={launch.max_restarts} must be 0 or more.")


def local_command(launch: LaunchConfig, overrides: Sequence[str]) -> List[str]:
    """torchrun on this machine: a standalone rendezvous (a free port and a fresh run id)."""
    check_counts(launch)
    if launch.nodes != 1:
        raise LaunchError(f"launch=local runs one node but launch.nodes={launch.nodes}; "
                          f"use launch=torchrun or launch=slurm for several nodes.")
    return [*torchrun_prefix(launch), "--standalone", "--nnodes=1", f"--nproc-per-node={launch.procs_per_node}",
            f"--max-restarts={launch.max_restarts}", "-m", "plait.train", *training_overrides(overrides)]


def torchrun_command(launch: LaunchConfig, overrides: Sequence[str]) -> List[str]:
    """The same command for every node of a multi-node run: c10d rendezvous at the first node."""
    check_counts(launch)
    if launch.rdzv_endpoint is None:
        raise LaunchError(f"launch=torchrun with launch.nodes={launch.nodes} needs launch.rdzv_endpoint=HOST:PORT, "
                          f"the first node's address and a free port.")
    split_endpoint(launch.rdzv_endpoint)
    train = training_overrides(overrides)
    run_id = launch.rdzv_id or default_rdzv_id(train, launch.rdzv_endpoint)
    return [*torchrun_prefix(launch), f"--nnodes={launch.nodes}", f"--nproc-per-node={launch.procs_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=join_timeout={launch.join_timeout_s}", f"--max-restarts={launch.max_restarts}",
            "-m", "plait.train", *train]


def _sbatch_lines(launch: LaunchConfig, log_dir: str) -> List[str]:
    lines = [f"--job-name={launch.job_name}", f"--nodes={launch.nodes}", "--ntasks-per-node=1",
             f"--time={launch.time}", f"--output={log_dir}/%x-%j.out", f"--error={log_dir}/%x-%j.out",
             "--open-mode=append"]
    if launch.gpus_per_node:
        lines.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.cpus_per_task:
        lines.append(f"--cpus-per-task={launch.cpus_per_task}")
    if launch.mem:
        lines.append(f"--mem={launch.mem}")
    if launch.partition:
        lines.append(f"--partition={launch.partition}")
    if launch.account:
        lines.append(f"--account={launch.account}")
    if launch.requeue:
        lines += ["--requeue", f"--signal=B:USR1@{launch.signal_s}"]
    return lines + list(launch.extra_sbatch)


def sbatch_script(launch: LaunchConfig, overrides: Sequence[str], log_dir: str) -> str:
    """The batch script: one task per node runs torchrun; the rendezvous is the first node, id = job id.

    On the warning signal (USR1, `launch.signal_s` before the limit) the script sends
    SIGTERM to the job step's processes (`scancel --signal=TERM`: srun itself, signalled,
    would kill the step at once); the trainers finish their step, checkpoint and exit with
    REQUEUE_EXIT_CODE; the script then requeues the job (same job id, so the same run
    directory, and `train.resume=auto` picks up the checkpoint).
    """
    check_counts(launch)
    train = [shlex.quote(o) for o in training_overrides(overrides)]
    runner = " ".join(shlex.quote(part) for part in torchrun_prefix(launch))
    host = (f"head_addr={shlex.quote(launch.rdzv_host)}" if launch.rdzv_host else
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
            'head_addr=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk \'{print $1}\')')
    port = str(launch.rdzv_port) if launch.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))"
    header = "\n".join(f"#SBATCH {line}" for line in _sbatch_lines(launch, log_dir))
    requeue = f"""
if [ "$status" -eq {REQUEUE_EXIT_CODE} ] || [ "$preempted" = 1 ]; then
    echo "plait: preempted (status $status): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi""" if launch.requeue else ""
    return f"""#!/bin/bash
# Written by plait-launch. Submit with: sbatch <this file>
{header}

set -u
{host}
rdzv_port={port}
echo "plait: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, rendezvous $head_addr:$rdzv_port"

preempted=0
# SIGTERM to the step's processes (torchrun agents and their workers), not to srun: srun
# would kill the step outright, while the workers need a moment to finish and checkpoint
stop_step() {{ echo "plait: $1, sending SIGTERM to the job step"; scancel --signal=TERM "$SLURM_JOB_ID"; }}
trap 'preempted=1; stop_step "warning signal (USR1)"' USR1
trap 'stop_step "SIGTERM"' TERM

srun --kill-on-bad-exit=1 --ntasks-per-node=1 \\
    {runner} --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={launch.procs_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" \\
    --rdzv-conf=join_timeout={launch.join_timeout_s} --max-restarts={launch.max_restarts} \\
    -m plait.train {" ".join(train)} &
step_pid=$!
status=0
wait "$step_pid" || status=$?
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid" || status=$?; done
echo "plait: job step exited with status $status"{requeue}
exit "$status"
"""
