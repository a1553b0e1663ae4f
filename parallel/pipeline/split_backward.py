"""A chunk's backward in two halves: I (the input's grad, now) and W (the weight grads, later).

Zero-bubble schedules (Qi et al., ICLR 2024) run the half the previous stage waits for, the
grad of the chunk's input, on the critical path, and the weight grads where the rank would
idle. Nothing is recomputed: W runs the same autograd nodes I left undone.

How the graph is cut (the method of torch.distributed.pipelining's `_backward.py`, written
for plait's runtime):

- The *input path* is every autograd node from which the chunk's input is reachable. I runs
  the engine from the output to the input only (`inputs=(x,)`, graph retained), so only
  input-path nodes run, and each computes only the grads the input needs (a matmul's
  MmBackward computes grad_x, not grad_W).
- A *boundary* node is an input-path node with an edge into the weight-only part of the
  graph (a parameter is reachable from it without passing the input path): a linear's
  matmul node, a norm's multiply. A pre-hook on each catches the grad flowing into it during I.
- W runs the engine again from each boundary node, with the caught grad, to the
  parameters behind it (`inputs=params`): the node runs once more, now computing only its
  weight-side grads, and the weight-only nodes below it run for the first time. Parameters
  that share boundary nodes are one group (one engine call); a group's boundary nodes get
  their caught grads back through a pre-hook, so a boundary node reached from another one is
  not counted twice.
- A weight used twice in a row (multi-token prediction's embedding at each depth: one use
  below the other on the input path) makes W walk the input path from one use down to the
  other, through nodes another group's W runs too. So W keeps the graph (as I does) and lets
  it go whole when it is done, when the last reference to it, `PendingWeights`, is dropped:
  the saved tensors all lived at W's start anyway, so its peak is the same.

The weights are the leaves the graph reaches other than the input, unless the caller names them:
the tensors the forward read, which under FSDP2 are the gathered parameters, not the sharded
ones the module holds between steps.

The weight grads equal the fused backward's bitwise: each is the same op on the same saved
tensors and grads; only its time moves. Grads accumulate into `.grad` (so data-parallel
hooks fire in W). A chunk whose input is not differentiable (the first stage, token ids)
has no input path: I does nothing and W is the whole backward.
"""

from collections import defaultdict, deque
from typing import Dict, List, Optional, Sequence, Set

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from plait.common.compat import run_backward, run_backward_edges


class PendingWeights:
    """What I leaves for W: per parameter group, the boundary nodes, their caught grads and the parameters."""

    __slots__ = ("groups", "whole")

    def __init__(self, groups: List[tuple], whole: Optional[tuple] = None):
        self.groups = groups  # [(boundary nodes, their caught grad tuples, params)]
        self.whole = whole    # (output, grad): no input path, W runs the whole backward


def _reverse_edges(root: Node) -> Dict[Node, List[Node]]:
    """child -> parents, over every node reachable from `root`."""
    parents: Dict[Node, List[Node]] = defaultdict(list)
    seen, queue = {root}, deque([root])
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents[child].append(node)
            if child not in seen:
                seen.add(child)
                queue.append(child)
    return parents


def _closure(starts: Sequence[Node], parents: Dict[Node, List[Node]], stop: Set[Node]):
    """Nodes reachable upward (toward the output) from `starts`, not entering `stop`; and the `stop` nodes met."""
    closure, met = set(starts), set()
    queue = deque(starts)
    while queue:
        for parent in parents.get(queue.popleft(), ()):
            if parent in stop:
                met.add(parent)
            elif parent not in closure:
                closure.add(parent)
                queue.append(parent)
    return closure, met


def _graph_leaves(parents: Dict[Node, List[Node]], input_nodes: Sequence[Node]) -> List[torch.Tensor]:
    """Every grad-requiring leaf the graph reaches (its AccumulateGrad nodes' tensors), the inputs excepted."""
    inputs = set(input_nodes)
    return [node.variable for node in parents if hasattr(node, "variable") and node not in inputs]


def _param_groups(root: Node, input_nodes: Sequence[Node], params: Optional[Sequence[torch.Tensor]]) -> List[tuple]:
    """[(boundary nodes, params)]: parameters merged where they share a boundary node; `params` None: every
    leaf of the graph but the inputs."""
    parents = _reverse_edges(root)
    if params is None:
        params = _graph_leaves(parents, input_nodes)
    input_path, _ = _closure(input_nodes, parents, set())
    group_of: Dict[Node, int] = {}
    groups: List[tuple] = []  # (set of boundary nodes, list of params)
    for param in params:
        node = get_gradient_edge(param).node
        if node not in parents:
            continue  # not used in this forward: no grad
        _, boundary = _closure([node], parents, input_path)
        merged = {group_of[n] for n in boundary if n in group_of}
        nodes, members = set(boundary), [param]
        for index in sorted(merged):
            nodes |= groups[index][0]
            members = groups[index][1] + members
            groups[index] = (set(), [])
        groups.append((nodes, members))
        for n in nodes:
            group_of[n] = len(groups) - 1
    return [(list(nodes), members) for nodes, members in groups if members]


def backward_input(output: torch.Tensor, grad: torch.Tensor, inputs: Sequence[torch.Tensor],
                   params: Optional[Sequence[torch.Tensor]] = None) -> PendingWeights:
    """I: accumulate the grads of `inputs` (leaves) from `output`'s grad; return what W needs.

    `params`: the weights W is to accumulate; None (the pipeline's choice): every leaf the graph reaches
    other than the inputs, the tensors the forward actually read (under FSDP2, the gathered parameters,
    not the sharded ones the module holds between steps)."""
    inputs = [x for x in inputs if x is not None and x.requires_grad]
    if not inputs:
        return PendingWeights([], whole=(output, grad))
    groups = _param_groups(output.grad_fn, [get_gradient_edge(x).node for x in inputs],
                           None if params is None else [p for p in params if p.requires_grad])
    caught: Dict[Node, tuple] = {}
    handles = [node.register_prehook(lambda grads, node=node: caught.__setitem__(node, grads))
               for nodes, _ in groups for node in nodes]
    try:
        run_backward(output, grad, inputs=tuple(inputs), keep_graph=True)
    finally:
        for handle in handles:
            handle.remove()
    return PendingWeights([(nodes, [caught.get(n) for n in nodes], members) for nodes, members in groups])


def backward_weight(pending: PendingWeights) -> None:
    """W: accumulate the parameters' grads from what I caught; the graph behind it goes with `pending`."""
    if pending.whole is not None:
        run_backward(*pending.whole)
        return
    for nodes, grads, params in pending.groups:
        edges, values = [], []
        for node, node_grads in zip(nodes, grads):
            for index, value in enumerate(node_grads or ()):
                if value is not None:
                    edges.append(GradientEdge(node, index))
                    values.append(value)
        if not edges:
            continue
        handles = [node.register_prehook(lambda _, kept=node_grads: kept)
                   for node, node_grads in zip(nodes, grads) if len(nodes) > 1]
        try:
            run_backward_edges(tuple(edges), tuple(values), tuple(params), keep_graph=True)
        finally:
            for handle in handles:
                handle.remove()
    pending.groups = []
