"""Greedy decoding that drafts with multi-token prediction: `plait generate RUN --temperature 0 --speculative`.

DeepSeek-V3 (section 5.4.3) uses its MTP module at inference for speculative decoding: the module, given the
last layer's hidden state at position t and the token at t + 1, guesses the token at t + 2. Here each step:

1. the first MTP depth drafts the token after the next one (`d`), from the hidden states and tokens the model has
   fixed so far (its own KV cache holds the earlier positions);
2. the model runs on two positions at once, the next token `y` and the draft `d`, each attending to the cache;
   its prediction after `y` is the token greedy decoding would draw there;
3. if that prediction is `d`, both positions stand: two tokens for one forward, and the model's prediction after
   `d` is the next `y`. Otherwise the draft's place is dropped from every layer's cache and the prediction after
   `y` is the next `y`: one token for the forward, as without a draft.

Every token is the model's own greedy choice given the tokens before it, so the text is greedy decoding's (up to
the rounding of a two-position forward against a one-position one). A model without MTP depths has nothing to
draft with; sampling (temperature > 0) would need a rejection step on the draft's distribution, not built.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch

from plait.train.decode import caches_in
from plait.train.model import Transformer


def _greedy(model: Transformer, normed: torch.Tensor) -> torch.Tensor:
    """The most likely real token at each position of the final norm's (or a depth's norm's) output [1, s, dim]."""
    return model.logits(normed)[..., :model.vocab_size].argmax(dim=-1)


class Drafter:
    """The first MTP depth, run behind the model on the positions it has fixed (the prompt at once, then one or two
    a step), with its own KV cache (which `generate_with_mtp` puts in the depth's block)."""

    def __init__(self, model: Transformer):
        self.model, self.layer = model, model.mtp.layers[0]

    def draft(self, hidden: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        """The guess for the token after the last of `following`: `hidden` [1, s, dim] the model's last-layer output
        at s positions not yet fed here, `following` [1, s] the token after each."""
        model = self.model
        _, normed = self.layer(hidden, model.embedding(following), model.rope_cos, model.rope_sin, None)
        return _greedy(model, normed[:, -1:])[:, 0]


@torch.no_grad()
def generate_with_mtp(model: Transformer, ids: torch.Tensor, max_new_tokens: int, eos: Optional[int] = None,
                      make_drafter: Callable[[Transformer], Drafter] = Drafter
                      ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(`ids` [1, prompt] followed by up to `max_new_tokens` greedy tokens, stopping after `eos` or at
    `model.cfg.max_seq_len`; {"forwards", "drafted", "accepted", "tokens_per_forward"}). `model`: a whole plain model
    with `model.mtp_layers` > 0, in eval mode; its attention seams are replaced by caches for the call.
    `make_drafter(model)`: what guesses (a `Drafter`, or one wrapping it)."""
    if model.mtp is None:
        raise ValueError("speculative decoding drafts with the model's multi-token prediction depths, and this model "
                         "has none (model.mtp_layers=0); decode without it.")
    if ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError("speculative decoding takes one row of at least one prompt token.")
    room, window = min(max_new_tokens, model.cfg.max_seq_len - ids.shape[1]), model.cfg.sliding_window
    with caches_in(model.layers.values(), window) as caches, caches_in([model.mtp.layers[0].block], window):
        drafter = make_drafter(model)
        hidden = model.trunk(ids)
        token = _greedy(model, model.norm(hidden[:, -1:]))[:, 0]
        out: List[torch.Tensor] = [token]
        behind, following = hidden, torch.cat([ids[:, 1:], token[:, None]], dim=1)  # not yet fed to the drafter
        stats = {"forwards": 1, "drafted": 0, "accepted": 0}
        while len(out) < room and (eos is None or int(token) != eos):
            if len(out) + 1 >= room:  # one place left: a plain step (no draft could stand)
                hidden = model.trunk(token[:, None])
                token = _greedy(model, model.norm(hidden))[:, 0]
                out.append(token)
                stats["forwards"] += 1
                continue
            guess = drafter.draft(behind, following)
            hidden = model.trunk(torch.stack([token, guess], dim=1))
            checked = _greedy(model, model.norm(hidden))[0]
            stats["forwards"] += 1
            stats["drafted"] += 1
            if int(checked[0]) == int(guess):
                stats["accepted"] += 1
                out += [guess, checked[1:]]
                behind, following = hidden, torch.cat([guess, checked[1:]])[None]
            else:
                for cache in caches:
                    cache.drop_last(1)
                out.append(checked[:1])
                behind, following = hidden[:, :1], checked[None, :1]
            token = out[-1].reshape(1)
        drawn = torch.cat([t.reshape(1) for t in out])[:room]
        if eos is not None and (drawn == eos).any():
            drawn = drawn[:int((drawn == eos).nonzero()[0]) + 1]
        stats["tokens_per_forward"] = len(drawn) / stats["forwards"]
        return torch.cat([ids, drawn[None]], dim=1), stats
