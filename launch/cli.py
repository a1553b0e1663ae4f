"""`plait-launch`: the Hydra app that turns `launch=local|torchrun|slurm` into processes.

    plait-launch launch.procs_per_node=2 parallel.tp=2              # torchrun here
    plait-launch launch=torchrun launch.nodes=2 launch.rdzv_endpoint=node0:29500 launch.dry_run=true
    plait-launch launch=slurm launch.nodes=4 launch.procs_per_node=8 launch.gpus_per_node=8
    plait-launch -m launch=slurm optim.lr=1e-3,3e-3                  # one job per sweep point

Every override that is not a `launch.*` key goes on to `-m plait.train` unchanged. The
whole config is validated for the launched world size (nodes x procs_per_node) first, so
a layout that cannot work fails here, not after a queue wait.
"""

import datetime
import ipaddress
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from plait.launch.commands import local_command, sbatch_script, split_endpoint, torchrun_command
from plait.launch.config import LaunchConfig
from plait.launch.errors import LaunchError
from plait.train import config as _schemas  # noqa: F401  (registers the config schemas with Hydra)

log = logging.getLogger("plait")


def fail(message: str, code: int = 2) -> None:
    print(f"plait-launch: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


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


def launch(cfg: DictConfig, overrides: Sequence[str], job_num: int = 0) -> int:
    """Validate `cfg` for the launched world size, then run, print or submit; returns an exit status."""
    from plait.parallel.grid import LayoutError
    from plait.train.config import ConfigError, validate

    spec: LaunchConfig = cfg.launch
    if spec.name not in ("local", "torchrun", "slurm"):
        raise LaunchError(f"launch={spec.name} is not one of local, torchrun, slurm.")
    world_size = spec.nodes * spec.procs_per_node
    try:
        validate(cfg, world_size)
    except (ConfigError, LayoutError) as error:
        raise type(error)(f"{error} (launch.nodes={spec.nodes} x launch.procs_per_node={spec.procs_per_node} "
                          f"= {world_size} processes)") from None
    if spec.name == "local":
        return run_command(local_command(spec, overrides), spec.dry_run)
    if spec.name == "torchrun":
        command = torchrun_command(spec, overrides)
        if not spec.dry_run:
            check_endpoint(spec)
        return run_command(command, spec.dry_run)
    return submit_slurm(spec, overrides, job_num)


def _task_overrides() -> List[str]:
    """This job's overrides (one sweep point's under -m), as the user typed them."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _job_num() -> int:
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get().job
    return int(job.num) if OmegaConf.is_missing(job, "num") is False and job.num is not None else 0


@hydra.main(config_path="pkg://plait.configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> int:
    from plait.train.cli import USER_ERRORS

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        status = launch(cfg, _task_overrides(), _job_num())
    except USER_ERRORS + (LaunchError,) as error:
        fail(str(error))
    if status:
        sys.exit(status)
    return status


def main() -> None:
    """Console entry point."""
    _hydra_main()


if __name__ == "__main__":
    main()
