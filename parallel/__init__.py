"""plait.parallel: the process grid, tensor-parallel layers, sharding specs, per-rank RNG."""
