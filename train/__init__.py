"""plait.train: the transformer, the training step and loop, checkpoints, export, metrics, the entry point.

Public names are listed in `__all__`; modules and names not listed are private and may
change. Construction takes explicit arguments (a config dataclass, a `Grid` or plain
values), never hidden globals. Names are imported lazily on first use.

Importing `plait.train` loads the config schemas (Hydra) only: `Trainer` and the rest
come on first access, and nothing imports DeepSpeed or starts a process group.
"""

from typing import TYPE_CHECKING

from plait.common.exports import lazy_exports

_EXPORTS = {
    # config
    "Config": "plait.train.config",
    "ModelConfig": "plait.train.config",
    "ConfigError": "plait.train.config",
    "load_config": "plait.train.config",
    "validate": "plait.train.config",
    # the model
    "Transformer": "plait.train.model",
    "Scales": "plait.train.model",
    "MoE": "plait.train.moe",
    "LatentAttention": "plait.train.mla",
    "build_model": "plait.train.build",
    "init_parameters": "plait.train.build",
    "build_chunks": "plait.train.build",
    "hidden_shape": "plait.train.build",
    "Parametrization": "plait.train.parametrization",
    "build_parametrization": "plait.train.parametrization",
    # the step and the loop
    "forward_backward": "plait.train.step",
    "Trainer": "plait.train.trainer",
    "MetricsSink": "plait.train.metrics",
    # checkpoints and export
    "SaveRequest": "plait.train.checkpoint",
    "save_checkpoint": "plait.train.checkpoint:save",
    "ShardReader": "plait.train.reshard",
    "load_params": "plait.train.reshard",
    "latest_checkpoint": "plait.train.checkpoint",
    "export_checkpoint": "plait.train.export",
    # decoding
    "generate": "plait.train.decode",
    "generate_with_mtp": "plait.train.speculative",
    # plans
    "make_plan": "plait.train.plan:plan",
    "Plan": "plait.train.plan",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # static tools see real imports; at run time they happen on first access
    from plait.train.checkpoint import SaveRequest, latest_checkpoint
    from plait.train.reshard import ShardReader, load_params
    from plait.train.checkpoint import save as save_checkpoint
    from plait.train.build import build_chunks, hidden_shape
    from plait.train.config import Config, ConfigError, ModelConfig, load_config, validate
    from plait.train.export import export_checkpoint
    from plait.train.decode import generate
    from plait.train.speculative import generate_with_mtp
    from plait.train.metrics import MetricsSink
    from plait.train.model import Scales, Transformer
    from plait.train.moe import MoE
    from plait.train.mla import LatentAttention
    from plait.train.parametrization import Parametrization, build_parametrization
    from plait.train.plan import Plan
    from plait.train.plan import plan as make_plan
    from plait.train.step import forward_backward
    from plait.train.trainer import Trainer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
