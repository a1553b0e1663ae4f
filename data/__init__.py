"""plait.data: text to token shards, token datasets, the unified tensor and the step-indexed loader.

Public names are listed in `__all__`; modules and names not listed are private and may
change. Construction takes explicit arguments (a config dataclass, a `Grid` or plain
values), never hidden globals. Names are imported lazily on first use.
"""

from typing import TYPE_CHECKING

from plait.common.exports import lazy_exports

_EXPORTS = {
    # config and errors
    "DataConfig": "plait.data.config",
    "DataError": "plait.data.errors",
    # text to shards
    "prepare_shards": "plait.data.prepare:prepare",
    "prepare_text": "plait.data.corpus",
    "TokenShard": "plait.data.shards",
    "ShardWriter": "plait.data.shards",
    # datasets, sampling and the loader
    "TokenDataset": "plait.data.dataset",
    "Sampler": "plait.data.sampler",
    "UnifiedTensor": "plait.data.unified",
    "Loader": "plait.data.loader",
    "document_ids": "plait.data.documents",
    "BatchRamp": "plait.data.rampup",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # static tools see real imports; at run time they happen on first access
    from plait.data.config import DataConfig
    from plait.data.corpus import prepare_text
    from plait.data.dataset import TokenDataset
    from plait.data.documents import document_ids
    from plait.data.rampup import BatchRamp
    from plait.data.errors import DataError
    from plait.data.loader import Loader
    from plait.data.prepare import prepare as prepare_shards
    from plait.data.sampler import Sampler
    from plait.data.shards import ShardWriter, TokenShard
    from plait.data.unified import UnifiedTensor


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
