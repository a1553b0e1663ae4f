"""`plait-train`: the Hydra app over `Trainer` (also `python -m plait.train`, and under torchrun).

Bad settings end with one line on stderr and exit status 2, never a traceback.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from plait.data.corpus import DataError
from plait.parallel.grid import LayoutError
from plait.train.config import ConfigError

USER_ERRORS = (ConfigError, DataError, LayoutError)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(message)s", stream=sys.stdout)


def fail(message: str, code: int = 2) -> None:
    print(f"plait-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(cfg: DictConfig) -> dict:
    """Train with `cfg` (or plan only, with train.dry_run=true); returns the last metrics."""
    from plait.train.trainer import Trainer

    setup_logging(cfg.logging.level)
    try:
        trainer = Trainer(cfg)
    except USER_ERRORS as error:
        fail(str(error))
    if trainer.grid.rank != 0:
        logging.getLogger("plait").setLevel(logging.WARNING)
    return trainer.fit()


@hydra.main(config_path="pkg://plait.configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console entry point."""
    _hydra_main()


if __name__ == "__main__":
    main()
