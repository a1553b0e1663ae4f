"""The words Muon (`plait.optim.muon`) and its layouts (`plait.parallel.matrices`) speak to each other in.

A rank hands the layout its pieces of each matrix's update, the function that orthogonalizes a
whole matrix and the scale a matrix's shape gives its step; it gets back, for each piece, the
parts of the results that fall in it (a fused weight's segments are separate matrices, so a
piece can span several), each with its matrix's scale.
"""

from typing import Callable, Dict, Tuple

import torch

# name -> (this rank's piece of the update, where the piece starts in the flattened local parameter)
Pieces = Dict[str, Tuple[torch.Tensor, int]]
# one part of a piece's result: (where it starts in the piece, its values, the scale they take)
Part = Tuple[int, torch.Tensor, float]
# a whole matrix -> its orthogonalized values
Orthogonalize = Callable[[torch.Tensor], torch.Tensor]
# (rows, columns) of a matrix -> the scale r(A, B) its step takes
Scale = Callable[[int, int], float]
