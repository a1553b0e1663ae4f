"""What autograd keeps for backward, measured."""

import torch


def saved_activation_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of distinct storages autograd saves during `run()`, parameters and buffers excluded."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())
