"""`plait-train`: the Hydra app over `Trainer` (also `python -m plait.train`, and under torchrun).

Bad settings end with one line on stderr and exit status 2, never a traceback.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from plait.data.corpus import DataError
from plait.launch.errors import LaunchError
from plait.offload.config import OffloadError, OffloadIOError
from plait.parallel.layout import LayoutError
from plait.parallel.pipeline.transport import TransportError
from plait.train.checkpoint import CheckpointError
from plait.train.config import ConfigError, load_config

USER_ERRORS = (ConfigError, DataError, LayoutError, LaunchError, CheckpointError, OffloadError, OffloadIOError,
               TransportError)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(message)s", stream=sys.stdout)


def fail(message: str, code: int = 2) -> None:
    print(f"plait-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(cfg: DictConfig) -> dict:
    """Train with `cfg` (or plan only, with train.dry_run=true); returns the last metrics."""
    from plait.train.trainer import Trainer

    setup_logging(cfg.logging.level)
    if cfg.train.dry_run:  # plan only: shard shapes on the meta device, no process group
        from plait.train.plan import dry_run
        return dry_run(cfg)
    from plait.launch.env import detect

    if detect().rank != 0:  # only rank 0 logs progress; the others speak up for warnings and errors
        logging.getLogger("plait").setLevel(logging.WARNING)
    try:
        trainer = Trainer(cfg)
    except USER_ERRORS as error:
        fail(str(error))
    try:
        metrics = trainer.fit()
    except SystemExit:  # preempted: checkpointed, leaving with the requeue status
        end_process_group()
        raise
    end_process_group()
    return metrics


def end_process_group() -> None:
    """Destroy the process group this run made, while the interpreter is still whole.

    Left to interpreter exit, gloo's worker threads may still hold finished work whose
    tensors need the GIL during finalization: a rank then aborts (SIGABRT, "terminate called
    without an active exception") after a run that succeeded, and torchrun fails the job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@hydra.main(config_path="pkg://plait.configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def _one_line(error: BaseException) -> str:
    """Hydra/OmegaConf's multi-line composition error as one sentence (no key dumps, no hints)."""
    lines = []
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line and not line.startswith(("full_key", "reference_type", "object_type", "To append",
                                             "Set the environment")) and line not in lines:
                lines.append(line)
        error = error.__cause__
    text = "; ".join(lines)
    return text.replace(":; ", ": ").replace(".; ", ". ")


def precheck(argv: list) -> None:
    """Compose the config once from plain overrides so a type error or unknown key ends in one line.

    Hydra flags (--cfg, --multirun, ...) are left to Hydra itself.
    """
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        load_config([arg for arg in argv if not arg.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))])
    except Exception as error:  # any composition failure is the user's setting
        fail(_one_line(error))


def main() -> None:
    """Console entry point."""
    precheck(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
