"""The words Muon (`plait.optim.muon`) and its layouts (`plait.parallel.matrices`) speak to each other in.

A rank hands the layout its pieces of each matrix's update and gets back, for each piece, the
parts of the orthogonalized result that fall in it (a fused weight's segments are separate
matrices, so a piece can span several), each with the scale its matrix's shape gives it.
"""

from typing import Callable, Dict, Tuple

import torch

# name -> (this rank's piece of the update, where the piece starts in the flattened local parameter)
Pieces = Dict[str, Tuple[torch.Tensor, int]]
# one part of a piece's result: (where it starts in the piece, its values, the scale they take)
Part = Tuple[int, torch.Tensor, float]
# a whole matrix -> (its orthogonalized values, the scale r(A, B) of its shape)
Orthogonalize = Callable[[torch.Tensor], Tuple[torch.Tensor, float]]
