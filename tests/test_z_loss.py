"""`train.z_loss`: PaLM's z x mean(logsumexp(logits)^2) joins the training loss, on one process and vocab-parallel
(the shard-level check is in test_tensor_parallel.py), and not the evaluation."""

import pytest
import torch

from dist_utils import run_ranks
from train_utils import train_steps
from plait.train.build import build_model
from plait.train.config import ConfigError, ModelConfig, load_config, validate


def test_the_model_adds_z_times_the_mean_squared_lse_in_training_only():
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=100, max_seq_len=32)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    plain = model.loss(logits, tokens[:, 1:])
    model.z_loss = 0.01
    lse = torch.logsumexp(logits[..., :100].float(), dim=-1)
    assert float(model.loss(logits, tokens[:, 1:])) == pytest.approx(float(plain + 0.01 * lse.square().mean()),
                                                                     rel=1e-6)
    model.loss_chunks = 4  # the slices carry it too
    assert float(model.loss(model(tokens[:, :-1]), tokens[:, 1:])) == pytest.approx(
        float(plain + 0.01 * lse.square().mean()), rel=1e-6)
    model.eval()
    assert float(model.loss(model(tokens[:, :-1]), tokens[:, 1:])) == pytest.approx(float(plain), rel=1e-6)


STEPS = 4
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=128", "train.seq_len=32",
        "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10", "optim.warmup_steps=2",
        "optim.lr=1e-3", "train.eval_every=0", "checkpoint.save_final=false", "train.z_loss=0.01"]


def test_tp2_pp2_with_z_loss_matches_one_process_and_z_changes_training_not_evaluation(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    reference = train_steps(0, 1, BASE, [], tmp_path / "one", cache, STEPS)
    without = train_steps(0, 1, BASE, ["train.z_loss=0"], tmp_path / "plain", cache, STEPS)
    assert reference[0][0] > without[0][0] + 1e-3  # the first step's loss carries z x lse^2
    for losses, norms, val in run_ranks(4, train_steps, BASE, ["parallel.tp=2", "parallel.pp=2",
                                                               "parallel.microbatches=2"], tmp_path / "many", cache,
                                        STEPS):
        assert losses == pytest.approx(reference[0], rel=1e-5)
        assert norms == pytest.approx(reference[1], rel=1e-5)
        assert val == pytest.approx(reference[2], rel=1e-5)


def test_a_negative_z_loss_is_refused():
    with pytest.raises(ConfigError, match=r"^train.z_loss=-0.1"):
        validate(load_config(["train.z_loss=-0.1"]))
