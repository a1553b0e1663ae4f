"""plait.parallel: the process grid, tensor-parallel layers, pipeline schedules and runtime, context and data
parallelism.

Public names are listed in `__all__`; everything else (modules and names not listed) is
private and may change. Every piece takes the `Grid` (or plain values) it needs as an
argument: there is no module-level process-group state, so one piece can be used alone.

Names are imported lazily on first use, so `import plait.parallel` stays cheap.
"""

from typing import TYPE_CHECKING

from plait.common.exports import lazy_exports

_EXPORTS = {
    # the grid
    "Layout": "plait.parallel.layout",
    "LayoutError": "plait.parallel.layout",
    "validate_layout": "plait.parallel.layout:validate",
    "Workload": "plait.parallel.layout",
    "Grid": "plait.parallel.grid",
    "ParallelConfig": "plait.parallel.config",
    # tensor and sequence parallelism
    "ShardSpec": "plait.parallel.sharding",
    "parallelize": "plait.parallel.plans",
    "param_specs": "plait.parallel.plans",
    "ColumnParallelLinear": "plait.parallel.tensor",
    "RowParallelLinear": "plait.parallel.tensor",
    "VocabParallelEmbedding": "plait.parallel.tensor",
    "vocab_parallel_cross_entropy": "plait.parallel.tensor",
    "all_reduce_coalesced": "plait.parallel.tensor",
    "ParallelRNG": "plait.parallel.random",
    # pipeline parallelism: schedules as data, and their runtime
    "build_schedule": "plait.parallel.pipeline.schedule",
    "simulate": "plait.parallel.pipeline.simulate",
    "PipelineRuntime": "plait.parallel.pipeline.runtime",
    "backward_input": "plait.parallel.pipeline.split_backward",
    "backward_weight": "plait.parallel.pipeline.split_backward",
    # context parallelism
    "split_sequence": "plait.parallel.context",
    "ring_attention": "plait.parallel.context",
    "ulysses_attention": "plait.parallel.context",
    # the gradient norm over the layout
    "global_grad_norm": "plait.parallel.grad_norm",
    # data parallelism and ZeRO-1
    "DataParallelGrads": "plait.parallel.data_parallel",
    "ZeroOptimizer": "plait.parallel.zero",
    # tied embeddings across pipeline stages
    "TiedWeights": "plait.parallel.tied",
    # ZeRO-2 and ZeRO-3 (torch's FSDP2 under plait's layout)
    "ShardedGrads": "plait.parallel.fsdp",
    "ShardOptimizer": "plait.parallel.shard_optimizer",
    # whole matrices from tp and ZeRO pieces (Muon)
    "ShardedMatrices": "plait.parallel.matrices",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # static tools see real imports; at run time they happen on first access
    from plait.parallel.config import ParallelConfig
    from plait.parallel.data_parallel import DataParallelGrads
    from plait.parallel.grad_norm import global_grad_norm
    from plait.parallel.grid import Grid
    from plait.parallel.layout import Layout, LayoutError, Workload
    from plait.parallel.layout import validate as validate_layout
    from plait.parallel.matrices import ShardedMatrices
    from plait.parallel.pipeline.runtime import PipelineRuntime
    from plait.parallel.pipeline.schedule import build_schedule
    from plait.parallel.pipeline.simulate import simulate
    from plait.parallel.pipeline.split_backward import backward_input, backward_weight
    from plait.parallel.context import ring_attention, split_sequence, ulysses_attention
    from plait.parallel.random import ParallelRNG
    from plait.parallel.plans import param_specs, parallelize
    from plait.parallel.sharding import ShardSpec
    from plait.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       all_reduce_coalesced, vocab_parallel_cross_entropy)
    from plait.parallel.tied import TiedWeights
    from plait.parallel.zero import ZeroOptimizer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
