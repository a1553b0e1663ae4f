"""fp16 loss scaling: the dynamic rule, the underflow it prevents, steps skipped on every rank of a
tp x pp x dp layout alike (weights untouched), and an exact resume of the scale and its counters.

fp16 autocast runs on the CPU too (its fp16 kernels round as a GPU's do in range), so all of this
runs in CI; `tests/test_gpu.py` runs the trainer under fp16 on CUDA.
"""

import pytest
import torch

from plait.optim.loss_scale import LossScaler
from tests.dist_utils import run_ranks


def test_dynamic_rule_grows_after_a_window_and_halves_from_the_hysteresis_th_overflow():
    scaler = LossScaler(scale=1024.0, window=3, hysteresis=2, minimum=256.0)
    flags = [True, False, False, False, True, True, True, True, True, False, False, False]
    trace = []
    for overflow in flags:
        scaler.update(overflow)
        trace.append(scaler.scale)
    # 1st overflow tolerated; 3 good steps double; after growth, the 2nd overflow halves and each next one
    # too, down to the minimum; 3 good steps double again
    assert trace == [1024, 1024, 1024, 2048, 2048, 1024, 512, 256, 256, 256, 256, 512]
    assert scaler.skipped == 6


def test_static_scale_never_moves_but_counts_skips():
    from plait.train.config import ConfigError, load_config, validate

    scaler = LossScaler.from_config(load_config(["train.precision=fp16", "train.loss_scale=128"]).train)
    for overflow in (True, False, True):
        scaler.update(overflow)
    assert (scaler.scale, scaler.dynamic, scaler.skipped) == (128.0, False, 2)
    dynamic = LossScaler.from_config(load_config(["train.precision=fp16"]).train)
    assert (dynamic.scale, dynamic.dynamic, dynamic.window, dynamic.hysteresis) == (65536.0, True, 1000, 2)
    refused = {("train.loss_scale=128",): "applies to train.precision=fp16 only",
               ("train.precision=fp16", "train.loss_scale=0"): "train.loss_scale=0",
               ("train.precision=fp16", "train.loss_scale_window=0"): "train.loss_scale_window=0",
               ("train.precision=fp16", "train.loss_scale_min=1e6"): "above train.loss_scale_initial"}
    for overrides, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            validate(load_config(list(overrides)))


def test_scaling_keeps_fp16_grads_that_underflow_without_it():
    """fp16 activation grads below 6e-8 flush to zero: scaled by 2^16 they survive, and the weight grads
    come out closer to fp32's (a scale that never reached the backward would give the unscaled error)."""
    from plait.train import ModelConfig, build_model
    from plait.train.step import forward_backward

    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64), seed=0)
    batch = torch.randint(0, 256, (2, 4, 65), generator=torch.Generator().manual_seed(0))

    def grads(precision, scale=1.0):
        model.zero_grad(set_to_none=True)
        forward_backward(model, batch, precision, loss_scale=scale)
        return {name: p.grad / scale for name, p in model.named_parameters()}

    reference = grads("fp32")

    def error(got):
        return max(float((got[n] - reference[n]).norm() / reference[n].norm()) for n in reference)

    unscaled, scaled = error(grads("fp16")), error(grads("fp16", 2.0 ** 16))
    assert scaled < unscaled / 2, (scaled, unscaled)


LAYOUTS = {"tp2-pp2": ["parallel.tp=2", "parallel.pp=2"],
           "pp2-dp2-zero3": ["parallel.pp=2", "parallel.zero=3"],
           "tp2-dp2-zero1": ["parallel.tp=2", "parallel.zero=1"]}


def overrides(run_dir, cache, steps=8, *extra):
    return ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=256",
            "train.seq_len=16", "train.batch_size=8", f"train.steps={steps}", "train.eval_every=0",
            "train.log_every=1", "train.progress=false", "train.peak_flops=1e10", "parallel.microbatches=2",
            f"train.run_dir={run_dir}", f"data.cache_dir={cache}", "checkpoint.save_final=false",
            "train.precision=fp16", "train.loss_scale_initial=16777216", "train.loss_scale_window=2",
            "train.loss_scale_hysteresis=1", *extra]


def train(trainer, steps):
    """Each step's (loss, scale used, skipped so far, weights untouched by it)."""
    from plait.parallel.fsdp import local

    records = []
    try:
        for _ in range(steps):
            before = [local(p).detach().clone() for p in trainer.named_params.values()]
            record = trainer.step()
            untouched = all(torch.equal(b, local(p)) for b, p in zip(before, trainer.named_params.values()))
            records.append((record["loss"], record["loss_scale"], record["skipped_steps"], untouched))
    finally:
        trainer.close()
    return records


def layouts_worker(rank, world, tmp, cache):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    return {name: train(Trainer(load_config(overrides(f"{tmp}/{name}", cache, 8, *extra)),
                                env=ProcessEnv(rank, 0, world, "torchrun")), 8)
            for name, extra in LAYOUTS.items()}


def test_overflowing_steps_are_skipped_on_every_rank_alike(tmp_path, stdlib_tokens):
    """From 2^24 the first steps overflow in fp16: each is skipped on every rank (no weight moves) and the scale
    halves until the grads fit. tp2 x pp2 computes one process's grads: the same scales, skips and losses.
    Under dp each rank's loss is the mean over its share of the batch, so before the dp average its grads
    are dp times one process's: the scale settles lower (an extra halving here), at the same point for
    ZeRO-1 and ZeRO-3, and until then the losses are one process's."""
    from plait.train import Trainer, load_config

    cache = stdlib_tokens[0].parent.parent
    expected = train(Trainer(load_config(overrides(tmp_path / "one", cache))), 8)
    untouched = [u for _, _, _, u in expected]
    assert untouched[0] and not all(untouched) and expected[-1][2] == sum(untouched)  # skips counted
    results = run_ranks(4, layouts_worker, str(tmp_path), str(cache))
    for name in LAYOUTS:
        for rank in range(4):  # every rank skips the same steps and keeps the same scale
            assert [g[1:] for g in results[rank][name]] == [g[1:] for g in results[0][name]], (name, rank)
    tp_pp = results[0]["tp2-pp2"]
    assert [g[1:] for g in tp_pp] == [e[1:] for e in expected]
    assert [g[0] for g in tp_pp] == pytest.approx([e[0] for e in expected], rel=2e-3)
    zero1, zero3 = results[0]["tp2-dp2-zero1"], results[0]["pp2-dp2-zero3"]
    assert [g[1:] for g in zero1] == [g[1:] for g in zero3]
    apart = next(i for i, (g, e) in enumerate(zip(zero1, expected)) if g[1:] != e[1:])
    assert zero1[apart][1] == expected[apart][1] and zero1[apart][3] and not expected[apart][3]  # dp overflows
    assert not all(g[3] for g in zero1)  # and then trains at half the scale
    for got in (zero1, zero3):
        assert [g[0] for g in got[:apart + 1]] == pytest.approx([e[0] for e in expected[:apart + 1]], rel=2e-3)


def test_resume_restores_the_scale_and_its_counters(tmp_path, stdlib_tokens):
    """Stopped after step 5 of 10 (the scale mid-window), the resumed run's losses, scales and skips equal,
    bit for bit, a run that never stopped."""
    from plait.train import Trainer, load_config

    cache = stdlib_tokens[0].parent.parent
    run = overrides(tmp_path / "run", cache, 10, "train.loss_scale_window=3", "train.threads=1")
    whole = train(Trainer(load_config(run)), 10)
    first = Trainer(load_config(run))
    train_part = [first.step() for _ in range(5)]
    assert first.loss_scaler.scale != 2.0 ** 24 and first.loss_scaler.skipped > 0  # a fresh scaler would differ
    first.save_checkpoint()
    first.close()
    resumed = Trainer(load_config([*run, f"train.resume={tmp_path / 'run' / 'checkpoints'}"]))
    assert resumed.loss_scaler.state_dict() == first.loss_scaler.state_dict()
    assert [(r["loss"], r["loss_scale"], r["skipped_steps"]) for r in train_part] == [w[:3] for w in whole[:5]]
    assert train(resumed, 5) == whole[5:]


def test_a_skipped_step_does_not_move_the_learning_rate_schedule(tmp_path, stdlib_tokens):
    """The schedule counts updates, as Megatron's and DeepSpeed's do: each step's lr is the schedule at the number
    of updates before it (steps less the skipped ones), so the warm-up is not eaten by the first overflows."""
    from plait.optim.schedule import lr_factor
    from plait.train import Trainer, load_config

    cache = stdlib_tokens[0].parent.parent
    cfg = load_config(overrides(tmp_path / "run", cache, 8, "optim.warmup_steps=4", "optim.lr=1e-3"))
    trainer = Trainer(cfg)
    try:
        records = [trainer.step() for _ in range(8)]
    finally:
        trainer.close()
    skipped_before = [0] + [r["skipped_steps"] for r in records[:-1]]
    assert skipped_before[-1] > 0  # some steps overflowed (from 2^24)
    assert [r["lr"] for r in records] == [1e-3 * lr_factor(step - skipped, 8, cfg.optim)
                                          for step, skipped in enumerate(skipped_before)]
    first_update = next(i for i, r in enumerate(records) if r["skipped_steps"] == skipped_before[i])
    assert first_update > 0 and records[first_update]["lr"] == records[0]["lr"]  # the warm-up starts at it
