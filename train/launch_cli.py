"""`plait-launch`: the Hydra app that turns `launch=local|torchrun|slurm` into processes.

    plait-launch launch.procs_per_node=2 parallel.tp=2              # torchrun here
    plait-launch launch=torchrun launch.nodes=2 launch.rdzv_endpoint=node0:29500 launch.dry_run=true
    plait-launch launch=slurm launch.nodes=4 launch.procs_per_node=8 launch.gpus_per_node=8
    plait-launch -m launch=slurm optim.lr=1e-3,3e-3                  # one job per sweep point

The whole config is validated for the launched world size (nodes x procs_per_node) first,
with the same checks and sentences as `plait-train`, so a layout that cannot work fails
here, not after a queue wait; then `plait.launch.submit.launch` runs, prints or submits.
Every override that is not a `launch.*` key goes on to `-m plait.train` unchanged.
"""

import logging
import sys
from typing import List, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from plait.launch.errors import LaunchError
from plait.launch.submit import launch
from plait.train.cli import USER_ERRORS, precheck
from plait.parallel.layout import LayoutError
from plait.train.config import validate


def fail(message: str, code: int = 2) -> None:
    print(f"plait-launch: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def validate_and_launch(cfg: DictConfig, overrides: Sequence[str], job_num: int = 0) -> int:
    """Validate `cfg` for the launched world size, then run, print or submit; returns an exit status."""
    spec = cfg.launch
    world_size = spec.nodes * spec.procs_per_node
    try:
        validate(cfg, world_size)
    except LayoutError as error:  # the layout was judged for this many processes: say so
        raise LayoutError(f"{error} (launch.nodes={spec.nodes} x launch.procs_per_node={spec.procs_per_node} "
                                f"= {world_size} processes)") from None
    return launch(spec, overrides, job_num)


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
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        status = validate_and_launch(cfg, _task_overrides(), _job_num())
    except USER_ERRORS + (LaunchError,) as error:
        fail(str(error))
    if status:
        sys.exit(status)
    return status


def main() -> None:
    """Console entry point."""
    precheck(sys.argv[1:], "plait-launch")
    _hydra_main()


if __name__ == "__main__":
    main()
