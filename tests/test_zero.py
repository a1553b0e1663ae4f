"""ZeRO-2 and ZeRO-3 (FSDP2 under plait's layout) against zero=0 on the same layout.

Each layout trains the same tiny model for 3 steps with AdamW and with Lion, clipping on
(the clip threshold is below every step's norm, so every step clips); the losses, the
gradient norms and every updated parameter must equal zero=0's (fp32, rel 1e-5). All
runs of one layout share one set of spawned ranks (a Trainer per run).
"""

import gc
from functools import partial
import json
import sys
import warnings

import pytest
import torch

from dist_utils import run_ranks
from plait.train.checkpoint import latest_checkpoint

STEPS = 3
CLIP = 0.05
BASE = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=128", "train.seq_len=32",
        "train.batch_size=16", "train.progress=false", "train.peak_flops=1e10", "optim.warmup_steps=0",
        "optim.lr=1e-3", "train.eval_every=0", "checkpoint.save_final=false", f"optim.grad_clip={CLIP}"]


def _run(rank, world, overrides, run_dir, cache):
    """(losses, norms, {name: whole parameter after the steps, as numpy: pickled by value}) of one run."""
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    cfg = load_config(BASE + list(overrides) + [f"train.run_dir={run_dir}", f"data.cache_dir={cache}"])
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
    records = [trainer.step() for _ in range(STEPS)]
    params = {name: tensor.detach().numpy().copy() for name, tensor in trainer.state(whole=True).named_params.items()}
    trainer.close()
    assert cfg.offload.backend == "none" or min(r["offload_offloaded_bytes"] for r in records) > 0  # it did offload
    return [r["loss"] for r in records], [r["grad_norm"] for r in records], params


def _runs(rank, world, layout, runs, run_dir, cache):
    return {name: _run(rank, world, layout + extra, f"{run_dir}/{name}", cache) for name, extra in runs}


RUNS = [(f"{optim}-zero{zero}", [f"optim={optim}", f"parallel.zero={zero}"])
        for optim in ("adamw", "lion") for zero in (0, 2, 3)]
LAYOUTS = {
    "dp4": (4, ["parallel.bucket_mb=0.05"], RUNS),
    "tp2-pp2-dp2": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.microbatches=4", "parallel.bucket_mb=0.05"], RUNS),
    "cp2-dp2-offload": (4, ["parallel.cp=2", "offload.backend=host", "offload.min_bytes=1024", "offload.keep_last=1",
                            "offload.device_filter=all"],
                        [run for run in RUNS if run[0] in ("adamw-zero0", "adamw-zero3")]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero2_and_zero3_equal_zero0(layout, stdlib_tokens, tmp_path):
    world, overrides, runs = LAYOUTS[layout]
    cache = stdlib_tokens[0].parent.parent
    for rank_runs in run_ranks(world, _runs, overrides, runs, str(tmp_path), cache, timeout=900):
        for optim in ("adamw", "lion"):
            if f"{optim}-zero0" not in rank_runs:
                continue
            losses, norms, params = rank_runs[f"{optim}-zero0"]
            assert min(norms) > CLIP  # every step clips
            for zero in [z for z in (2, 3) if f"{optim}-zero{z}" in rank_runs]:
                their_losses, their_norms, their_params = rank_runs[f"{optim}-zero{zero}"]
                assert their_losses == pytest.approx(losses, rel=1e-5), (optim, zero)
                assert their_norms == pytest.approx(norms, rel=1e-5), (optim, zero)
                assert their_params.keys() == params.keys()
                for name, tensor in params.items():
                    torch.testing.assert_close(torch.from_numpy(their_params[name]), torch.from_numpy(tensor),
                                               rtol=1e-5, atol=1e-7,
                                               msg=lambda m: f"{optim} zero={zero} {name}: {m}")


def live_float_bytes() -> int:
    """Bytes of every distinct floating-point tensor storage alive in this process: weights, grads, optimizer
    state, FSDP's buffers and anything else a step leaves behind (measured, not computed). Wrapper tensors
    count through their local tensors; the token data (int16) is not model state and is left out."""
    from torch.distributed.tensor import DTensor

    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on some of gc's objects touches deprecated torch names
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if not isinstance(obj, DTensor) and obj.device.type != "meta" and obj.is_floating_point():
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def _held(rank, world, zero, run_dir, cache):
    """Floating-point tensor bytes the trainer adds to the process, after 3 steps (between steps)."""
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    cfg = load_config(BASE + [f"parallel.zero={zero}", f"train.run_dir={run_dir}/z{zero}", f"data.cache_dir={cache}"])
    before = live_float_bytes()
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
    records = [trainer.step() for _ in range(STEPS)]
    held = live_float_bytes() - before
    trainer.close()
    return held, {key: records[-1][key] for key in ("weight_bytes", "grad_bytes", "optimizer_bytes")}


def _held_by_level(rank, world, run_dir, cache):
    return {zero: _held(rank, world, zero, run_dir, cache) for zero in (0, 1, 2, 3)}


def test_zero3_holds_one_over_dp_of_zero0(stdlib_tokens, tmp_path):
    """dp=4: a zero=3 rank holds at most 1.15 / 4 of a zero=0 rank's weights + grads + state, measured; the
    step metrics' weights / grads / state bytes (at the update) are the planner's, divided as each level shards."""
    from plait.train import load_config
    from plait.train.plan import plan

    cache = stdlib_tokens[0].parent.parent
    per_rank = run_ranks(4, _held_by_level, str(tmp_path), cache)
    stage = plan(load_config(BASE), 4).stages[0]
    for by_level in per_rank:
        held = {zero: live for zero, (live, _) in by_level.items()}
        for zero, (_, metrics) in by_level.items():  # the step metrics' split against the planner's figures
            shards = (1, 1, 1) if zero == 0 else (1, 1, 4) if zero == 1 else (4, 4, 4)
            planned = [stage.weights / shards[0], stage.grads / shards[1], stage.optimizer / shards[2]]
            measured = [metrics["weight_bytes"], metrics["grad_bytes"], metrics["optimizer_bytes"]]
            assert measured == pytest.approx(planned, rel=0.02), zero
        print("live float bytes per rank by zero level: " + ", ".join(f"{z}: {b:,}" for z, b in held.items())
              + f"; zero=3 / zero=0 = {held[3] / held[0]:.3f}")
        assert held[3] <= 1.15 / 4 * held[0]
        assert held[3] <= held[2] <= held[1] < held[0]  # each level holds less than the one before


# checkpoints: exact resume after kill -9, and layout-free ------------------------------------
@pytest.mark.slow
def test_zero3_killed_and_preempted_resumes_exactly(tmp_path, stdlib_tokens):
    from test_checkpoint import kill_and_resume

    cache = stdlib_tokens[0].parent.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "plait.train"]
    reference, resumed, _ = kill_and_resume(tmp_path, cache, command, ["parallel.zero=3"])
    assert len(set(reference.values())) == 20
    assert [resumed[step] for step in range(11, 21)] == [reference[step] for step in range(11, 21)]


def test_zero3_checkpoint_resumes_at_dp2_and_at_zero0(tmp_path, stdlib_tokens):
    """Saved at dp=4 zero=3 after 3 steps; resumed at dp=2 zero=3 and at one process zero=0: the loss on a
    fixed batch and the next steps' losses equal the saving run's own continuation."""
    from test_checkpoint import MORE_STEPS, load_worker, save_worker, the_result

    cache = str(stdlib_tokens[0].parent.parent)
    saved = the_result(run_ranks(4, partial(save_worker, batch=8), str(tmp_path), cache, ["parallel.zero=3"]))
    index = json.loads((latest_checkpoint(tmp_path / "ckpt") / "index.json").read_text())
    assert (index["layout"]["dp"], index["layout"]["zero"]) == (4, 3)
    _assert_written_in_four_shares(latest_checkpoint(tmp_path / "ckpt"), index)
    loaded = {"dp2-zero3": the_result(run_ranks(2, partial(load_worker, batch=8), str(tmp_path), cache,
                                                ["parallel.zero=3"], "z3")),
              "dp1-zero0": load_worker(0, 1, str(tmp_path), cache, [], "z0", batch=8)}
    for name, (fixed, losses) in loaded.items():
        assert fixed == pytest.approx(saved[0], rel=1e-6, abs=0), name
        assert losses == pytest.approx(saved[1], rel=1e-5, abs=0), name
        assert len(losses) == MORE_STEPS


def _assert_written_in_four_shares(checkpoint, index):
    """The 4 dp ranks each wrote a model and an optimizer file; every tensor is in exactly one of them, and no
    writer holds more than a quarter of the bytes plus the largest tensor (each rank gathers only its share)."""
    from plait.train.reshard import ShardReader

    reader = ShardReader(checkpoint)
    for kind, section in (("model", "params"), ("optim", "optimizer_state")):
        files = sorted(f for f in index["files"] if f.startswith(kind))
        assert files == [f"{kind}-tp00-pp00-part{part:03d}.safetensors" for part in range(4)], files
        held = {f: reader.tensors(f) for f in files}
        names = [key.split("/")[0] for tensors in held.values() for key in tensors]
        assert sorted(set(names)) == sorted(index[section]) == sorted(index["params"])
        if kind == "model":
            assert len(names) == len(set(names))  # each parameter once
        sizes = [sum(t.numel() * t.element_size() for t in tensors.values()) for tensors in held.values()]
        largest = max(t.numel() * t.element_size() for tensors in held.values() for t in tensors.values())
        assert max(sizes) <= sum(sizes) / 4 + largest, sizes


def _evaluate_then_save(rank, world, run_dir, cache):
    """zero=2 and 3: after an evaluation (forwards only: no backward reshards) the weights are sharded again,
    and a checkpoint's whole parameters equal the ones the step before it left."""
    from torch.distributed.tensor import DTensor

    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    out = {}
    for zero in (2, 3):
        cfg = load_config(BASE + [f"parallel.zero={zero}", f"train.run_dir={run_dir}/z{zero}", f"data.cache_dir={cache}"])
        trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
        trainer.step()
        before = {name: tensor.detach().clone() for name, tensor in trainer.state(whole=True).named_params.items()}
        trainer.evaluate(batches=1)
        sharded = all(isinstance(p, DTensor) for chunk in trainer.chunks for p in chunk.parameters())
        after = trainer.state(whole=True).named_params
        out[zero] = sharded and all(torch.equal(after[name], tensor) for name, tensor in before.items())
        trainer.close()
    return out


def test_an_evaluation_leaves_the_weights_sharded(stdlib_tokens, tmp_path):
    cache = stdlib_tokens[0].parent.parent
    for result in run_ranks(2, _evaluate_then_save, str(tmp_path), cache):
        assert result == {2: True, 3: True}


# zero-bubble schedules: the split backward under FSDP2 ---------------------------------------
def split_against_fused(rank, world, device_type="cpu", zero=3):
    """A middle chunk (hidden states in and out) sharded by ShardedGrads twice from one seed: one backwards whole
    over 3 micro-batches, the other runs the 3 I's, then the 3 W's, each followed by `after_weights` (a
    zero-bubble order). Returns [(split input grad, fused input grad)] and {name: (split grad rows, fused grad
    rows)}, as numpy arrays (pickled by value: a tensor from a worker that has exited cannot be fetched)."""
    from plait.parallel.fsdp import ShardedGrads, local
    from plait.parallel.grid import Grid
    from plait.parallel.pipeline.split_backward import backward_input, backward_weight
    from plait.train.build import build_model
    from tests.offload_utils import TINY

    device = torch.device(device_type)
    grid = Grid.build(device=device)
    models = []
    for _ in range(2):
        model = build_model(TINY, seed=3, device=device)
        model.embed, model.norm, model.head = None, None, None  # a middle chunk
        models.append(model)
    fused, split = models
    fused_grads, split_grads = ShardedGrads([fused], grid, zero), ShardedGrads([split], grid, zero)
    generator = torch.Generator(device=device).manual_seed(rank)
    pending, input_grads = [], []
    for _ in range(3):
        x = torch.randn(2, 16, TINY.dim, device=device, generator=generator)
        grad = torch.randn(2, 16, TINY.dim, device=device, generator=generator)
        x_fused, x_split = x.clone().requires_grad_(), x.clone().requires_grad_()
        fused(x_fused).backward(grad)
        pending.append(backward_input(split(x_split), grad, [x_split]))  # the weights: the graph's own leaves
        input_grads.append((x_split.grad.cpu().numpy(), x_fused.grad.cpu().numpy()))
    for item in pending:
        backward_weight(item)
        split_grads.after_weights(0)
    fused_grads.finish()
    split_grads.finish()
    weight_grads = {name: (local(p.grad).cpu().numpy(), local(q.grad).cpu().numpy())
                    for (name, p), q in zip(split.named_parameters(), fused.parameters())}
    return input_grads, weight_grads


@pytest.mark.parametrize("zero", [2, 3])
def test_split_backward_under_fsdp_equals_the_fused_one_bitwise(zero):
    """dp=2: every rank's input grads and gradient shards after I's then W's equal a fused backward's, bit for bit
    (each W's grads reduce-scattered right after it, as FSDP2 does after a fused backward)."""
    for input_grads, weight_grads in run_ranks(2, split_against_fused, "cpu", zero):
        assert all((split == fused).all() for split, fused in input_grads)
        assert len(weight_grads) == 4 * 6  # TINY's 4 blocks, 6 weights each
        for name, (split, fused) in weight_grads.items():
            assert (split == fused).all() and abs(split).sum() > 0, name


def test_zero_bubble_schedules_under_zero2_and_zero3_equal_1f1b(stdlib_tokens, tmp_path):
    """pp2 x dp2: ZB-H1 under zero=2 and zero=3 trains exactly as 1F1B under the same level (fp32 AdamW and bf16
    Lion: the losses, grad norms and every parameter bitwise); ZB-V (two chunks a rank, handed over on it) under
    zero=3 as under zero=0: losses and norms to rel 1e-5, each parameter to 1e-5 of its largest entry (1F1B's
    zero=3 differs from its zero=0 by 2.8e-6 of it: reduce-scatter and all-reduce sum in different orders, and
    AdamW's normalization magnifies that where a grad is tiny; a lost micro-batch of grads is 1e-1)."""
    cache = stdlib_tokens[0].parent.parent
    layout = ["parallel.pp=2", "parallel.microbatches=4", "parallel.bucket_mb=0.05"]
    runs = [(f"{optim}-zero{zero}-{schedule}", [f"parallel.zero={zero}", f"parallel.schedule={schedule}", *extra])
            for optim, extra in (("adamw", ["optim=adamw"]), ("lion-bf16", ["optim=lion", "train.precision=bf16"]))
            for zero in (2, 3) for schedule in ("1f1b", "zbh1")]
    runs += [(f"adamw-zero{zero}-zbv", [f"parallel.zero={zero}", "parallel.schedule=zbv"]) for zero in (0, 3)]
    for rank_runs in run_ranks(4, _runs, layout, runs, str(tmp_path), cache, timeout=900):
        for optim in ("adamw", "lion-bf16"):
            for zero in (2, 3):
                one_f_one_b, zero_bubble = rank_runs[f"{optim}-zero{zero}-1f1b"], rank_runs[f"{optim}-zero{zero}-zbh1"]
                assert zero_bubble[:2] == one_f_one_b[:2], (optim, zero)
                assert all((zero_bubble[2][name] == tensor).all() for name, tensor in one_f_one_b[2].items())
        losses, norms, params = rank_runs["adamw-zero0-zbv"]
        their_losses, their_norms, their_params = rank_runs["adamw-zero3-zbv"]
        assert their_losses == pytest.approx(losses, rel=1e-5) and their_norms == pytest.approx(norms, rel=1e-5)
        for name, tensor in params.items():
            assert abs(their_params[name] - tensor).max() <= 1e-5 * abs(tensor).max(), name
