"""`train.loss_chunks`: the head and the loss a slice of the sequence at a time, recomputed in backward.

Held to: the same loss and grads as whole logits (untied, tied with muP multipliers); the bytes the
forward keeps for backward, which lose the [b, s, vocab] logits and softmax; every layout against
one process without chunks (sequence parallelism, where slices are gathered across tp, the tied
head under a pipeline, a zero-bubble split backward, ZeRO-3).
"""

import pytest
import torch

from dist_utils import run_ranks
from train_utils import train_steps
from plait.train.build import build_model
from plait.train.config import ConfigError, ModelConfig, load_config, validate
from plait.train.model import Scales


def loss_and_grads(model, tokens, chunks):
    model.loss_chunks = chunks
    model.zero_grad()
    loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tie, scales", [(False, Scales()), (True, Scales(2.0, 0.5, 1.0 / 16))],
                         ids=["untied", "tied-mup"])
def test_slices_give_the_whole_logits_loss_and_grads(tie, scales):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=64, tie_embeddings=tie)
    model = build_model(cfg, seed=3, scales=scales)
    tokens = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(0))
    whole, whole_grads = loss_and_grads(model, tokens, 0)
    sliced, sliced_grads = loss_and_grads(model, tokens, 4)
    assert torch.allclose(sliced, whole, rtol=1e-6)
    for name, grad in whole_grads.items():
        assert torch.allclose(sliced_grads[name], grad, rtol=1e-5, atol=1e-7), name


def saved_bytes(model, tokens, chunks):
    """(bytes of every tensor the forward and loss keep for backward, the largest one's element count)."""
    model.loss_chunks = chunks
    sizes = []

    def pack(tensor):
        sizes.append((tensor.numel() * tensor.element_size(), tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.loss(model(tokens[:, :-1]), tokens[:, 1:])
    return sum(size for size, _ in sizes), max(count for _, count in sizes)


def test_the_forward_no_longer_keeps_the_logits():
    vocab, batch, seq = 4096, 4, 64
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=vocab, max_seq_len=seq)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    whole_bytes, whole_largest = saved_bytes(model, tokens, 0)
    sliced_bytes, sliced_largest = saved_bytes(model, tokens, 8)
    logits = batch * seq * vocab
    assert whole_largest >= logits  # the logits (or their softmax) are kept whole
    assert sliced_largest < logits // 8 + 1  # nothing larger than one slice's share of them
    assert whole_bytes - sliced_bytes >= 2 * 4 * logits * 0.9  # the fp32 logits and softmax are gone, ~8 MiB here


STEPS = 4
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=128", "train.seq_len=32",
        "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10", "optim.warmup_steps=2",
        "optim.lr=1e-3", "train.eval_every=0", "checkpoint.save_final=false", "parallel.microbatches=2"]


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "model.tie_embeddings=true"],
    ["parallel.pp=2", "parallel.schedule=zbv", "parallel.zero=1"],
    ["parallel.cp=2", "parallel.zero=3"],
], ids=["tp2-sp-pp2-tied", "pp2-zbv-dp2-zero1", "cp2-dp2-zero3"])
def test_layouts_with_slices_match_one_process_with_whole_logits(overrides, tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    tied = [o for o in overrides if o.startswith("model.")]
    reference = train_steps(0, 1, BASE, tied, tmp_path / "one", cache, STEPS)
    for losses, norms, val in run_ranks(4, train_steps, BASE, overrides + ["train.loss_chunks=4"], tmp_path / "many",
                                        cache, STEPS):
        assert losses == pytest.approx(reference[0], rel=1e-5)
        assert norms == pytest.approx(reference[1], rel=1e-5)
        assert val == pytest.approx(reference[2], rel=1e-5)


def test_slices_that_do_not_divide_the_held_tokens_are_refused():
    with pytest.raises(ConfigError, match=r"^train.loss_chunks=3 does not divide the 16 tokens a rank holds at the "
                                          r"head \(train.seq_len / parallel.cp / parallel.tp \(sequence parallel\)\)"):
        validate(load_config(BASE + ["train.loss_chunks=3", "parallel.tp=2", "parallel.sequence_parallel=true"]),
                 world_size=2)
    validate(load_config(BASE + ["train.loss_chunks=16", "parallel.tp=2", "parallel.sequence_parallel=true"]),
             world_size=2)
    with pytest.raises(ConfigError, match=r"^train.loss_chunks=4 with parallel.zero=3 under parallel.schedule=zbv: "
                                          r"the weight half of the split backward would recompute the head"):
        validate(load_config(BASE + ["train.loss_chunks=4", "parallel.pp=2", "parallel.schedule=zbv",
                                     "parallel.zero=3"]), world_size=4)
