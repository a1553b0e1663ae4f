"""Residual dropout at every layout: tp 2 with sequence parallelism x pp 2 on 4 gloo ranks trains with
dropout on (the parallel RNG's streams on each rank), and a run resumed from its checkpoint draws the
same masks, so its losses equal the uninterrupted run's bit for bit."""

import torch

from tests.dist_utils import run_ranks


def overrides(run_dir, cache, dropout):
    return ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=256",
            f"model.dropout={dropout}", "train.seq_len=16", "train.batch_size=8", "train.steps=4",
            "train.eval_every=0", "train.log_every=1", "train.progress=false", "train.peak_flops=1e10",
            f"train.run_dir={run_dir}", f"data.cache_dir={cache}", "checkpoint.save_final=false",
            "parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true", "parallel.microbatches=2"]


def dropout_worker(rank, world, tmp, cache):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    env = ProcessEnv(rank, 0, world, "torchrun")
    trainer = Trainer(load_config(overrides(f"{tmp}/drop", cache, 0.2)), env=env)
    first = [trainer.step()["loss"] for _ in range(2)]
    trainer.save_checkpoint()
    continued = [trainer.step()["loss"] for _ in range(2)]
    trainer.close()
    resumed = Trainer(load_config(overrides(f"{tmp}/drop", cache, 0.2) + ["train.resume=auto"]), env=env)
    again = [resumed.step()["loss"] for _ in range(2)]
    resumed.close()
    plain = Trainer(load_config(overrides(f"{tmp}/plain", cache, 0.0)), env=env)
    without = [plain.step()["loss"] for _ in range(2)]
    plain.close()
    return first, continued, again, without


def test_dropout_trains_at_tp2_sp_pp2_and_resumes_exactly(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    results = run_ranks(4, dropout_worker, str(tmp_path), str(cache))
    first, continued, again, without = results[0]
    assert all(torch.isfinite(torch.tensor(first + continued)))
    assert again == continued  # the masks after a resume are the masks of the uninterrupted run
    assert first != without  # dropout is on: the losses are not the dropout-free ones
    assert all(result[:3] == results[0][:3] for result in results)  # every rank reports the same losses
