"""Which keys each query may see, beyond causality: inside its document, within a sliding window.

`AttentionMask` is handed down a forward (one per micro-batch) and made into booleans only where
attention runs over the whole sequence: `dense(s, device)` gives [b or 1, 1, s, s], True where
query i may attend to key j. Plain attention calls it with its own length; under context
parallelism, Ulysses calls it with the gathered length (the whole sequence, in its natural
order); the dense mask is made once per length and shared by every layer of the forward.

    documents [b, s]: each token's document number (`plait.data.document_ids`): j in i's document
    window W:         i - j < W (the query and the W - 1 keys before it; Mistral's sliding window)

With rotary positions attention depends only on the distance between tokens, so a document
sees exactly what it would alone, wherever it starts in the window.
"""

from typing import Dict, Optional, Tuple

import torch


class AttentionMask:
    """Causal attention narrowed to documents and/or a sliding window; `dense` makes the booleans."""

    def __init__(self, documents: Optional[torch.Tensor] = None, window: Optional[int] = None):
        if documents is None and window is None:
            raise ValueError("an AttentionMask narrows causal attention: give documents, a window or both.")
        self.documents, self.window = documents, window
        self._made: Dict[Tuple[int, str], torch.Tensor] = {}

    @classmethod
    def of(cls, documents: Optional[torch.Tensor], window: Optional[int]) -> Optional["AttentionMask"]:
        """The mask for a forward, or None where plain causal attention is all there is."""
        return cls(documents, window) if documents is not None or window is not None else None

    def dense(self, s: int, device: torch.device) -> torch.Tensor:
        key = (s, str(device))
        if key not in self._made:
            self._made[key] = self._make(s, torch.device(device))
        return self._made[key]

    def _make(self, s: int, device: torch.device) -> torch.Tensor:
        places = torch.arange(s, device=device)
        distance = places[:, None] - places[None, :]
        allowed = distance >= 0
        if self.window is not None:
            allowed = allowed & (distance < self.window)
        if self.documents is None:
            return allowed[None, None]
        if self.documents.shape[-1] != s:
            raise ValueError(f"documents cover {self.documents.shape[-1]} tokens but attention runs over {s}.")
        documents = self.documents.to(device)
        return (allowed[None] & (documents[:, :, None] == documents[:, None, :]))[:, None]
