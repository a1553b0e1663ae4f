"""Running, printing or submitting a launch: `launch(spec, overrides)` for launch=local|torchrun|slurm.

Every override that is not a `launch.*` key goes on to `-m plait.train` unchanged. The
`plait-launch` command (`plait.train.launch_cli`) validates the whole config for the
launched world size first, then calls `launch` here.
"""

import datetime
import ipaddress
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Sequence

from plait.common.checks import choice, number
from plait.launch.commands import local_command, sbatch_script, split_endpoint, torchrun_command
from plait.launch.config import LaunchConfig
from plait.launch.errors import LaunchError

log = logging.getLogger("plait")


def _is_local_address(host: str) -> bool:
    """Whether `host` names this machine (its loopback or one of its interfaces)."""
    try:
        address = socket.gethostbyname(host)
    except OSError:
        raise LaunchError(f"launch.rdzv_endpoint host {host!r} does not resolve; use the first node's "
                          f"address or a name every node can resolve.") from None
    if ipaddress.ip_address(address).is_loopback:
        return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def check_endpoint(launch: LaunchConfig) -> None:
    """Fail early, naming launch.rdzv_endpoint, when a remote endpoint never answers.

    The first node hosts the rendezvous, so an endpoint on this machine is not probed.
    """
    host, port = split_endpoint(launch.rdzv_endpoint)
    if _is_local_address(host):
        return
    deadline = time.monotonic() + launch.connect_timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, launch.connect_timeout_s)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"launch.rdzv_endpoint={launch.rdzv_endpoint} did not answer within "
                    f"launch.connect_timeout_s={launch.connect_timeout_s} s ({error.strerror or error}); start the "
                    f"first node's launcher first, or fix the address and port.") from None
            time.sleep(1.0)


def write_atomically(path: Path, text: str) -> None:
    """Temp name, then rename: a script is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.chmod(temp, 0o755)
    os.replace(temp, path)


def submit_slurm(launch: LaunchConfig, overrides: Sequence[str], job_num: int) -> int:
    """Write the sbatch script and submit it (or print it with launch.dry_run=true)."""
    log_dir = Path(launch.output_dir).resolve()
    script = sbatch_script(launch, overrides, str(log_dir))
    if launch.dry_run:
        print(script)
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("launch=slurm needs `sbatch` on PATH and none was found; run on a Slurm login node, "
                          "or add launch.dry_run=true to print the script.")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = log_dir / f"{launch.job_name}-{stamp}-{job_num}.sbatch"
    write_atomically(path, script)
    result = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"sbatch rejected {path}: {result.stderr.strip() or result.stdout.strip()} "
                          f"(check launch.partition, launch.account, launch.time and launch.nodes).")
    job_id = result.stdout.strip().split(";")[0]
    print(f"plait-launch: submitted job {job_id} ({path}); log {log_dir}/{launch.job_name}-{job_id}.out", flush=True)
    return 0


def run_command(command: List[str], dry_run: bool) -> int:
    print(shlex.join(command), flush=True)
    if dry_run:
        return 0
    return subprocess.run(command).returncode


def _run_local(spec: LaunchConfig, overrides: Sequence[str], job_num: int) -> int:
    return run_command(local_command(spec, overrides), spec.dry_run)


def _run_torchrun(spec: LaunchConfig, overrides: Sequence[str], job_num: int) -> int:
    command = torchrun_command(spec, overrides)
    if not spec.dry_run:
        check_endpoint(spec)
    return run_command(command, spec.dry_run)


# launch=<name> -> how it runs: the keys are the choices validation accepts and lists
LAUNCHERS = {"local": _run_local, "torchrun": _run_torchrun, "slurm": submit_slurm}


def validate_launch(spec: LaunchConfig) -> None:
    """The `launch` group's rules (LaunchError, one sentence naming the setting)."""
    choice(LaunchError, "launch", spec.name, LAUNCHERS)
    for key in ("nodes", "procs_per_node", "join_timeout_s", "connect_timeout_s"):
        number(LaunchError, f"launch.{key}", getattr(spec, key), low=1, integer=True)
    for key in ("max_restarts", "gpus_per_node", "signal_s"):
        number(LaunchError, f"launch.{key}", getattr(spec, key), low=0, integer=True)
    for key in ("world_size", "rdzv_port", "cpus_per_task"):
        if getattr(spec, key) is not None:
            number(LaunchError, f"launch.{key}", getattr(spec, key), low=1, integer=True)


def launch(spec: LaunchConfig, overrides: Sequence[str], job_num: int = 0) -> int:
    """Run, print or submit `spec` (a validated launch config); returns an exit status."""
    validate_launch(spec)
    return LAUNCHERS[spec.name](spec, overrides, job_num)
