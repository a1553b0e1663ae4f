"""Where documents begin inside packed token windows, for attention that stays inside a document.

A window of `train.seq_len` tokens is cut from documents laid end to end, each ended by the
end-of-document token (`eos`). `document_ids` numbers each token's document so the model
can mask attention across documents (`model.attn_mask=document`). The end-of-document
token opens the document after it, as a beginning-of-sequence token would: the first word
of a document is predicted from that token alone, as at the start of generation, and the
last word of a document predicts it from inside its own document. (Megatron's
`--reset-attention-mask` keeps the token with the document it ends.)
"""

import torch


def document_ids(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """[..., s] document numbers of `tokens` [..., s]: 0 up to the first `eos`, then one more at each `eos`."""
    return torch.cumsum(tokens == eos, dim=-1, dtype=torch.int32)
