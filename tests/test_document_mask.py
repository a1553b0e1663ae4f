"""`model.attn_mask=document`: attention stays inside each packed document.

With rotary positions a document then sees exactly what it would alone, wherever it starts in
the window: the model-level test holds each document's logits in a packed sequence to the same
document run by itself. The trainer is held to a hand computation of its first loss, and every
layout to one process. The standard-library corpus has few document ends in a short window, so
the trainer tests count lines as documents (`data.eos_id=10`, the newline byte): most windows
then hold several.
"""

import pytest
import torch

from dist_utils import run_ranks
from train_utils import train_steps
from plait.data.documents import document_ids
from plait.train.build import build_model
from plait.train.config import ConfigError, ModelConfig, load_config, validate
from plait.train.model import Scales

STEPS = 6
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=128", "train.seq_len=32",
        "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10", "optim.warmup_steps=2",
        "optim.lr=1e-3", "train.eval_every=0", "checkpoint.save_final=false", "model.attn_mask=document",
        "data.eos_id=10"]


def test_document_ids_count_the_end_tokens_that_open_each_document():
    tokens = torch.tensor([[5, 7, 0, 3, 0, 0, 9], [0, 1, 2, 3, 4, 5, 0]])
    assert document_ids(tokens, 0).tolist() == [[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 2]]


@torch.no_grad()
def test_each_packed_document_sees_what_it_would_alone():
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=64)
    model = build_model(cfg, seed=1, scales=Scales(2.0, 0.5, 1.0 / 16)).eval()
    generator = torch.Generator().manual_seed(0)
    tail = torch.randint(1, 100, (5,), generator=generator)  # a document cut by the window's start
    documents = [tail] + [torch.cat((torch.tensor([0]), torch.randint(1, 100, (n,), generator=generator)))
                          for n in (9, 14, 1, 6)]
    orders = (documents, documents[:1] + documents[1:][::-1])  # two rows, the whole documents in other orders
    packed = torch.stack([torch.cat(order) for order in orders])
    out = model(packed, documents=document_ids(packed, 0))
    for row, order in enumerate(orders):
        start = 0
        for document in order:
            alone = model(document[None])[0]
            assert torch.allclose(out[row, start:start + len(document)], alone, atol=1e-5), (row, start)
            start += len(document)
    assert (model(packed) - out).abs().max() > 0.1  # plain causal attention sees across documents


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    return train_steps(0, 1, BASE, [], tmp_path_factory.mktemp("ref"), cache, STEPS), cache


def test_the_trainer_attends_inside_documents(tmp_path, stdlib_tokens):
    """Its first loss is the hand-computed one with the document mask, not the causal one."""
    from plait.train import Trainer

    cache = stdlib_tokens[0].parent.parent
    trainer = Trainer(load_config(BASE + [f"train.run_dir={tmp_path}", f"data.cache_dir={cache}"]))
    assert trainer.loader.eos == 10
    model, batch = trainer.chunks[0], trainer.loader.batch(0)
    inputs, targets = batch[:, :, :-1], batch[:, :, 1:]
    assert int((inputs == 10).sum()) >= batch.shape[0] * batch.shape[1]  # about a line end per window at least
    with torch.no_grad():
        masked = sum(model.loss(model(i, documents=document_ids(i, 10)), t) for i, t in zip(inputs, targets))
        causal = sum(model.loss(model(i), t) for i, t in zip(inputs, targets))
    masked, causal = float(masked) / len(inputs), float(causal) / len(inputs)
    assert trainer.step()["loss"] == pytest.approx(masked, rel=1e-6)
    assert abs(masked - causal) > 1e-3
    trainer.close()


LAYOUTS = {
    "tp2-sp-pp2-vpp2": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "parallel.vpp=2",
                        "parallel.microbatches=4"],
    "cp2-ulysses-tp2": ["parallel.cp=2", "parallel.cp_mode=ulysses", "parallel.tp=2"],
    "pp2-zbv-dp2-zero1": ["parallel.pp=2", "parallel.schedule=zbv", "parallel.microbatches=4", "parallel.zero=1"],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_one_process_under_the_document_mask(name, reference, tmp_path):
    (ref_losses, ref_norms, ref_val), cache = reference
    for losses, norms, val in run_ranks(4, train_steps, BASE, LAYOUTS[name], tmp_path, cache, STEPS):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        assert val == pytest.approx(ref_val, rel=1e-5)


def test_ring_attention_and_unknown_document_ends_are_refused(tmp_path, stdlib_tokens):
    from plait.data.errors import DataError
    from plait.data.loader import Loader
    from plait.data.shards import ShardWriter

    cfg = load_config(BASE + ["parallel.cp=2"])
    with pytest.raises(ConfigError, match=r"^model.attn_mask=document with parallel.cp=2 needs "
                                          r"parallel.cp_mode=ulysses \(each rank attends"):
        validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="model.attn_mask=sliding is not one of causal, document"):
        validate(load_config(["model.attn_mask=sliding"]))
    import numpy as np

    writer = ShardWriter(tmp_path / "shard", np.dtype(np.uint16))  # a Megatron shard: no end-of-document token
    writer.add(np.arange(4000) % 256)
    writer.close()
    data = load_config([f"data.path={tmp_path / 'shard'}"]).data
    assert Loader.from_config(data, 32, 8, 1).eos is None
    data.eos_id = 10
    assert Loader.from_config(data, 32, 8, 1).eos == 10
    from plait.train import Trainer

    overrides = [o for o in BASE if not o.startswith("data.eos_id")]
    with pytest.raises(DataError, match=r"^model.attn_mask=document needs the data's end-of-document token, which "
                                        r"this data does not record .*; set data.eos_id.$"):
        Trainer(load_config(overrides + [f"data.path={tmp_path / 'shard'}", f"train.run_dir={tmp_path / 'r'}"]))
