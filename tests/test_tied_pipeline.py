"""Tied embeddings under a pipeline: the last stage's head copy stays equal to the embedding, bit for bit, and
the run trains as one process does (losses and grad norms to 1e-5, fp32) under 1F1B, interleaved, ZB-H1 and
ZB-V (whose last stage sits beside the embedding on rank 0), with tp2, and with dp2 under ZeRO-1, ZeRO-3 and
ZeRO-2 with ZB-V; checkpoints
hold the embedding alone and move between pp=2 and one process both ways."""

import pytest
import torch

from tests.dist_utils import run_ranks

STEPS = 4
TOL = 1e-5


def overrides(run_dir, cache, *extra):
    return ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=256",
            "model.tie_embeddings=true", "train.seq_len=16", "train.batch_size=8", f"train.steps={STEPS * 2}",
            "train.eval_every=0", "train.log_every=1", "train.progress=false", "train.peak_flops=1e10",
            "optim.warmup_steps=1", "optim.lr=3e-3", f"train.run_dir={run_dir}", f"data.cache_dir={cache}",
            "checkpoint.save_final=false", "parallel.microbatches=4", *extra]


def tied_weights(trainer):
    """(embedding, head copy) as this rank holds them (None where it holds neither)."""
    params = dict(trainer.grads.full_params())
    pick = lambda name: params[name].detach().clone() if name in params else None  # noqa: E731
    return pick("embed.weight"), pick("head.weight")


def train(trainer, steps=STEPS):
    try:
        records = [trainer.step() for _ in range(steps)]
        embed, head = tied_weights(trainer)
        position = (trainer.grid.tp_rank, trainer.grid.dp_rank)
        return {"losses": [r["loss"] for r in records], "norms": [r["grad_norm"] for r in records],
                "embed": embed, "head": head, "position": position}
    finally:
        trainer.close()


CASES = {2: {"1f1b": ["parallel.pp=2"], "interleaved": ["parallel.pp=2", "parallel.vpp=2"],
             "zbh1": ["parallel.pp=2", "parallel.schedule=zbh1"], "zbv": ["parallel.pp=2", "parallel.schedule=zbv"]},
         4: {"tp2-pp2": ["parallel.tp=2", "parallel.pp=2"],
             "pp2-dp2-zero1": ["parallel.pp=2", "parallel.zero=1", "parallel.bucket_mb=0.01"],
             "pp2-dp2-zero3": ["parallel.pp=2", "parallel.zero=3"],
             "zbv-dp2-zero2": ["parallel.pp=2", "parallel.schedule=zbv", "parallel.zero=2"]}}


def worker(rank, world, tmp, cache):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    return {name: train(Trainer(load_config(overrides(f"{tmp}/{name}", cache, *extra)),
                                env=ProcessEnv(rank, 0, world, "torchrun")))
            for name, extra in CASES[world].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    from plait.train import Trainer, load_config

    cache = stdlib_tokens[0].parent.parent
    result = train(Trainer(load_config(overrides(tmp_path_factory.mktemp("one"), cache))))
    assert result["head"] is None and result["losses"][-1] < result["losses"][0]  # one process: one matrix
    return result, cache


@pytest.mark.parametrize("world", [2, 4])
def test_tied_embeddings_train_as_one_process_and_stay_equal(world, reference, tmp_path):
    expected, cache = reference
    results = run_ranks(world, worker, str(tmp_path), str(cache))
    for name in CASES[world]:
        per_rank = [result[name] for result in results]
        for rank, got in enumerate(per_rank):
            assert got["losses"] == pytest.approx(expected["losses"], rel=TOL), (name, rank)
            assert got["norms"] == pytest.approx(expected["norms"], rel=TOL), (name, rank)
        embeds = {r["position"]: r["embed"] for r in per_rank if r["embed"] is not None}
        heads = {r["position"]: r["head"] for r in per_rank if r["head"] is not None}
        assert embeds and embeds.keys() == heads.keys(), name
        for position, embed in embeds.items():  # the copy took the embedding's every update
            assert torch.equal(embed, heads[position]), (name, position)


def resume_worker(rank, world, tmp, cache):
    """pp=2 tied: 2 steps, a checkpoint, 2 more; the same 2 again resumed from the checkpoint; and a pp=2 run
    started from a one-process checkpoint."""
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    env = ProcessEnv(rank, 0, world, "torchrun")
    trainer = Trainer(load_config(overrides(f"{tmp}/pp2", cache, "parallel.pp=2")), env=env)
    first = [trainer.step()["loss"] for _ in range(2)]
    trainer.save_checkpoint()
    after = train(trainer, 2)
    again = Trainer(load_config(overrides(f"{tmp}/pp2", cache, "parallel.pp=2", "train.resume=auto")), env=env)
    resumed = train(again, 2)  # the copy's weights and optimizer state read from the embedding's
    started = Trainer(load_config(overrides(f"{tmp}/from-one", cache, "parallel.pp=2",
                                            f"checkpoint.init_from={tmp}/one/checkpoints")), env=env)
    return first, after, resumed, tied_weights(started)


def test_tied_checkpoints_hold_the_embedding_alone_and_move_between_layouts(reference, tmp_path):
    import json

    from plait.train import Trainer, load_config
    from plait.train.checkpoint import latest_checkpoint

    _, cache = reference
    one = Trainer(load_config(overrides(tmp_path / "one", cache)))
    [one.step() for _ in range(2)]
    one.save_checkpoint()
    one_embed = one.named_params["embed.weight"].detach().clone()
    one.close()
    results = run_ranks(2, resume_worker, str(tmp_path), str(cache))
    saved = latest_checkpoint(tmp_path / "pp2" / "checkpoints")
    index = json.loads((saved / "index.json").read_text())
    assert "embed.weight" in index["params"] and "head.weight" not in index["params"]
    assert "head.weight" not in index["optimizer_state"]
    resumed = Trainer(load_config(overrides(tmp_path / "pp1", cache, f"train.resume={saved}")))
    assert resumed.step_num == 2
    continued = train(resumed, 2)["losses"]
    for rank, (first, after, resumed_pp2, (embed, head)) in enumerate(results):
        assert resumed_pp2["losses"] == after["losses"], rank  # pp=2 -> pp=2: exact
        assert after["losses"] == pytest.approx(continued, rel=TOL), rank  # pp=2 -> one process
        started = embed if embed is not None else head  # one process -> pp=2: both copies read the embedding
        assert torch.equal(started, one_embed), rank
