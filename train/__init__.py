"""plait.train: the transformer, the training step and loop, metrics, and the Hydra entry point."""

from plait.train.config import Config, ConfigError, load_config, validate
from plait.train.model import Scales, Transformer, build_model, init_parameters


def __getattr__(name):
    if name == "Trainer":  # keeps `import plait.train` light for config-only users
        from plait.train.trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = ["Config", "ConfigError", "load_config", "validate", "Transformer", "Scales",
           "build_model", "init_parameters", "Trainer"]
