"""The training loop on real text: the loss falls, metrics reach the JSONL file, the CLI fails cleanly."""

import json
import os
import subprocess
import sys

import pytest
import torch

from plait.train import Trainer, load_config

SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "train.seq_len=64", "train.batch_size=8",
         "train.progress=false", "train.threads=1", "train.peak_flops=1e10"]


def _overrides(tmp_path, cache, *extra):
    return SMALL + [f"train.run_dir={tmp_path}", f"data.cache_dir={cache}", *extra]


def test_loss_falls_on_stdlib_text_and_metrics_reach_jsonl(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    cfg = load_config(_overrides(tmp_path, cache, "train.steps=40", "train.log_every=10", "train.eval_every=40",
                                 "optim.lr=3e-3", "optim.warmup_steps=5"))
    trainer = Trainer(cfg)
    initial = trainer.evaluate(batches=2)
    last = trainer.fit()
    final = trainer.evaluate(batches=2)
    assert initial > 5.0  # about ln(256) = 5.55 nats per byte at init
    assert final < initial - 1.5, (initial, final)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [10, 20, 30, 40]
    train_record = next(r for r in records if r["step"] == 40 and "loss" in r)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_bytes"} <= set(train_record)
    assert train_record["loss"] == pytest.approx(last["loss"])
    assert any("val_loss" in r for r in records)
    assert (tmp_path / "config.yaml").read_text().count("dim: 64") == 1


def test_gradient_accumulation_matches_one_big_batch(tmp_path, stdlib_tokens):
    """4 micro-batches of 2 give the same step as 1 micro-batch of 8 (loss scaled by 1/m)."""
    cache = stdlib_tokens[0].parent.parent
    results = []
    for micro in (1, 4):
        cfg = load_config(_overrides(tmp_path / str(micro), cache, "train.steps=3", f"parallel.microbatches={micro}"))
        trainer = Trainer(cfg)
        results.append([trainer.step()["loss"] for _ in range(3)])
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "plait.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (["optim.lr=abc"], "optim.lr=abc"),
    (["model.bogus=1"], "model.bogus"),
    (["data.path=/no/such/place"], "data.path=/no/such/place does not exist"),
    (["train.batch_size=7", "parallel.microbatches=2"], "train.batch_size=7 is not divisible"),
    (["model.n_heads=6"], "model.n_heads=6 does not divide model.dim=256"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_empty_corpus_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _cli(f"data.path={tmp_path / 'empty'}", f"data.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert result.returncode == 2 and "holds no non-empty text files" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_composed_config(tmp_path):
    result = _cli("--cfg", "job", "optim.lr=0.0007", cwd=tmp_path)
    assert result.returncode == 0 and "lr: 0.0007" in result.stdout and "n_layers: 4" in result.stdout


def test_cli_trains_on_user_text_and_writes_run_dir(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    run = tmp_path / "run"
    result = _cli(f"data.path={corpus}", f"data.cache_dir={tmp_path}/cache", f"train.run_dir={run}",
                  "train.steps=4", "train.log_every=2", "train.eval_every=4", *SMALL[:5], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loss " in result.stdout and "val_loss " in result.stdout
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def _params_norms(rank, world, base, overrides, run_dir, cache):
    """Each step's logged params_norm on this rank."""
    from train_utils import make_trainer

    trainer = make_trainer(rank, world, base, overrides, run_dir, cache)
    norms = [trainer.step()["params_norm"] for _ in range(3)]
    whole = None
    if world == 1:  # the norm of every weight in one process, by hand
        whole = float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in trainer.model.parameters())))
    trainer.close()
    return norms, whole


PARAMS_NORM_BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=96", "train.seq_len=32",
                    "train.batch_size=8", "train.progress=false", "train.peak_flops=1e10", "train.eval_every=0",
                    "checkpoint.save_final=false", "train.log_params_norm=true", "model.tie_embeddings=true"]


@pytest.mark.parametrize("overrides", [["parallel.tp=2", "parallel.pp=2", "parallel.microbatches=2"],
                                       ["parallel.tp=2", "parallel.zero=1"], ["parallel.pp=2", "parallel.zero=3"]],
                         ids=["tp2-pp2-tied", "tp2-dp2-zero1", "pp2-dp2-zero3"])
def test_the_logged_params_norm_is_the_whole_models_under_any_layout(overrides, tmp_path, stdlib_tokens):
    """`train.log_params_norm`: each weight counted once (tp shards, ZeRO pieces, the tied head copy of pp left out):
    one process's norm, which is the hand-computed norm of its weights."""
    from dist_utils import run_ranks

    cache = stdlib_tokens[0].parent.parent
    norms, whole = _params_norms(0, 1, PARAMS_NORM_BASE, [], tmp_path / "one", cache)
    assert norms[-1] == pytest.approx(whole, rel=1e-6) and norms[0] != norms[-1]
    for rank_norms, _ in run_ranks(4, _params_norms, PARAMS_NORM_BASE, overrides, tmp_path / "many", cache):
        assert rank_norms == pytest.approx(norms, rel=1e-5)
