"""The embedding on the last pipeline stage: copies kept equal to the first stage's embedding.

With `model.tie_embeddings=true` one matrix is both the embedding (stage 0) and the output
head (the last stage); with `model.mtp_layers` the multi-token prediction depths, beside the
head, embed tokens too. Under a pipeline those stages may sit on different ranks, so, as in
Megatron-LM, the last stage holds copies (the tied head's weight, the depths' embedding):
drawn from the same seed as the embedding (equal from the start, `Transformer.tied_copies`),
given the same optimizer group, and after every backward all their grads are summed
(`sync`), so every copy takes the same update and stays equal bit for bit. The sum runs
between the two ranks that hold them, one pair per (tp, cp, dp) position (the "embedding
group"), or on one rank where a V schedule puts the last stage beside the first.

Under ZeRO-1 each copy has a gradient bucket of its own (`DataParallelGrads(alone=...)`)
so that dp rank r's slice of the embedding's grad covers the same elements as its slice of
each copy's: the pieces are summed as they are. Under ZeRO-2/3 all are FSDP2 shards of the
same shape over the same dp mesh, so dp rank r holds the same rows of each: summed alike.
The trainer counts the matrix once in the global grad norm, and checkpoints hold only the
embedding (the copy is read from it on load).
"""

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.distributed as dist

from plait.parallel.grid import Grid



class TiedWeights:
    """The embedding group of this rank and the sum of the tied grads over it."""

    def __init__(self, grid: Grid, stage_ranks: Sequence[int], names: Sequence[str]):
        """`stage_ranks[s]`: the pp rank of virtual stage s; `names`: the matrix's name on the first stage, then its
        copies' on the last (`plait.train.model.tied_names`). Collective: every rank makes every group."""
        self.grid, self.first, self.copies = grid, names[0], tuple(names[1:])
        self.first_rank, self.last_rank = stage_ranks[0], stage_ranks[-1]
        self.local = self.first_rank == self.last_rank  # a V: the matrix and its copies on one rank, summed in place
        self.group = None
        if self.local or grid.mesh is None:
            return
        for ranks in grid.layout.groups_of("pp"):  # ordered by pp coordinate
            pair = [ranks[self.first_rank], ranks[self.last_rank]]
            group = dist.new_group(pair)
            if grid.rank in pair:
                self.group = group

    @torch.no_grad()
    def sync(self, entries: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Sum the tied matrix's grads (whole, ZeRO-1 pieces or FSDP2 rows: the same slices on both sides) over
        its holders."""
        grads: Dict[str, List[torch.Tensor]] = {name: [] for name in (self.first, *self.copies)}
        for name, grad in entries:
            if name in grads and grad.numel():
                grads[name].append(grad)
        if self.local:  # a V: the embedding and its copies here, each piece with its twins
            held = zip(*grads.values())
        elif grads[self.first]:  # stage 0's rank: the embedding's pieces
            held = [(piece,) for piece in grads[self.first]]
        else:  # the last stage's rank: its copies' pieces, each with its twins (or nothing: a middle stage)
            held = zip(*(grads[name] for name in self.copies))
        for twins in held:
            total = twins[0]
            for other in twins[1:]:
                total.add_(other)
            if not self.local:
                dist.all_reduce(total, group=self.group)  # with the other side's (pieces pair up in order)
            for other in twins[1:]:
                other.copy_(total)
