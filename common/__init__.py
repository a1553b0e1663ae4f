"""plait.common: the few helpers every part needs, owned by no strand.

- `exports`: lazy public names for each subpackage's `__init__`;
- `logs`: log a line once per process;
- `collectives`: the tensor collectives under whichever name this torch has;
- `compat`: every private torch name plait touches, in one place, each tested;
- `optimizer_state`: setting an optimizer's state through its own `load_state_dict`;
- `precision`: `train.precision`'s half types and their dtypes.

Nothing here imports another part of plait, so any part may import it.
"""
