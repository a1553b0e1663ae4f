"""Context parallelism: the sequence split over cp ranks (zigzag), attention by ring or Ulysses.

Every check compares against one process attending over the whole sequence (fp32, rel 1e-5):
outputs and the grads of q, k and v, causal and not, with grouped-query attention.
"""

import pytest
import torch
import torch.nn.functional as F

from plait.parallel.context import positions, split_sequence
from tests.dist_utils import run_ranks


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_zigzag_positions_pair_an_early_chunk_with_a_late_one():
    assert positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    whole = torch.cat([positions(64, 4, r) for r in range(4)])
    assert sorted(whole.tolist()) == list(range(64))  # every token on exactly one rank
    x = torch.arange(32).view(2, 16)
    assert split_sequence(x, 2, 1, dim=1).tolist() == [list(range(4, 12)), list(range(20, 28))]


def attention_worker(rank, world, cases):
    from plait.parallel import context
    from plait.parallel.context import ring_attention, ulysses_attention

    fused = context.block_kernels

    results = []
    for mode, causal, heads, kv_heads in cases:
        generator = torch.Generator().manual_seed(11)
        b, s, d = 2, 32, 8
        q = torch.randn(b, heads, s, d, generator=generator)
        k = torch.randn(b, kv_heads, s, d, generator=generator)
        v = torch.randn(b, kv_heads, s, d, generator=generator)
        out_grad = torch.randn(b, heads, s, d, generator=generator)
        # one process: the whole sequence
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*whole, is_causal=causal, scale=0.3, enable_gqa=heads != kv_heads)
        expected.backward(out_grad)
        # this rank's tokens
        local = [split_sequence(t, world, rank, dim=2).clone().requires_grad_() for t in (q, k, v)]
        # ring-math: the blocks from their scores (the path CUDA takes), instead of the CPU flash kernel
        context.block_kernels = fused if mode == "ring" else \
            (lambda device: (context.manual_block_forward, context.manual_block_backward))
        if mode.startswith("ring"):
            out = ring_attention(*local, scale=0.3, causal=causal, group=None, ring=list(range(world)))
        else:
            out = ulysses_attention(*local, scale=0.3, causal=causal, group=None, cp=world)
        out.backward(split_sequence(out_grad, world, rank, dim=2))
        errors = {"out": _relative(out, split_sequence(expected.detach(), world, rank, dim=2))}
        for name, mine, full in zip("qkv", local, whole):
            errors[f"d{name}"] = _relative(mine.grad, split_sequence(full.grad, world, rank, dim=2))
        results.append(((mode, causal, heads, kv_heads), errors))
    return results


CASES = [("ring", True, 4, 4), ("ring", False, 4, 4), ("ring", True, 4, 2), ("ring", False, 8, 2),
         ("ring-math", True, 4, 2), ("ring-math", False, 4, 4),
         ("ulysses", True, 4, 4), ("ulysses", False, 8, 4), ("ulysses", True, 8, 4)]


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_and_ulysses_attention_equal_one_process(cp):
    for rank_results in run_ranks(cp, attention_worker, CASES):
        for case, errors in rank_results:
            assert max(errors.values()) < 1e-5, (cp, case, errors)


# the model ------------------------------------------------------------------------------------
MODEL = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)


def model_worker(rank, world, cases):
    """Loss and every grad of the whole model at cp = world (grads averaged over cp, as the trainer's
    reduction does) against one process over the whole sequences."""
    import torch.distributed as dist

    from plait.parallel.grid import Grid
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    cfg = ModelConfig(**MODEL)
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(5))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    reference = build_model(cfg, seed=3)
    expected = reference.loss(reference(inputs), targets)
    expected.backward()
    grid = Grid.build(cp=world)
    results = []
    for mode in cases:
        model = build_model(cfg, grid, seed=3, cp_mode=mode)
        loss = model.loss(model(split_sequence(inputs, world, rank)), split_sequence(targets, world, rank))
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        errors = {"loss": abs(float(mean) / world - float(expected)) / float(expected)}
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            errors[name] = _relative(grad / world, q.grad)
        results.append((mode, errors))
    return results


@pytest.mark.parametrize("cp", [2, 4])
def test_the_whole_model_at_cp_equals_one_process(cp):
    """Rotary positions follow each token's place: a wrong position would change the loss and every grad."""
    for rank_results in run_ranks(cp, model_worker, ["ring", "ulysses"] if cp == 2 else ["ring"]):
        for mode, errors in rank_results:
            worst = max(errors, key=errors.get)
            assert errors[worst] < 1e-5, (cp, mode, worst, errors[worst])


def saved_bytes_worker(rank, world, seq):
    """Bytes autograd saves for one forward of the model at cp = world, this rank's (saved-tensor hooks)."""
    from plait.parallel.grid import Grid
    from plait.train.build import build_model
    from plait.train.config import ModelConfig

    cfg = ModelConfig(**{**MODEL, "max_seq_len": seq})
    tokens = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    grid = Grid.build(cp=world) if world > 1 else Grid.single()
    model = build_model(cfg, grid, seed=3)
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(split_sequence(tokens, world, rank))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(nbytes for pointer, nbytes in storages.items() if pointer not in parameters)


def test_saved_activations_per_rank_at_cp4_are_under_a_third_of_cp1s():
    seq = 4096
    alone = saved_bytes_worker(0, 1, seq)
    per_rank = run_ranks(4, saved_bytes_worker, seq)
    assert max(per_rank) <= 0.3 * alone, (per_rank, alone)


# the trainer ----------------------------------------------------------------------------------
STEPS = 3


def overrides(run_dir, cache, *extra):
    return ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
            "model.vocab_size=256", "train.seq_len=32", "train.batch_size=8", f"train.steps={STEPS}",
            "train.eval_every=0", "train.eval_batches=2", "train.log_every=1", "train.progress=false",
            "train.peak_flops=1e10", f"train.run_dir={run_dir}", f"data.cache_dir={cache}",
            "checkpoint.save_final=false", "parallel.microbatches=2", *extra]


def train(trainer, steps=STEPS):
    try:
        records = [trainer.step() for _ in range(steps)]
        return [r["loss"] for r in records], [r["grad_norm"] for r in records], trainer.evaluate()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    from plait.train import Trainer, load_config

    cache = stdlib_tokens[0].parent.parent
    return train(Trainer(load_config(overrides(tmp_path_factory.mktemp("cp1"), cache)))), cache


def trainer_worker(rank, world, run_dir, cache, extra):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    trainer = Trainer(load_config(overrides(run_dir, cache, *extra)), env=ProcessEnv(rank, 0, world, "torchrun"))
    return train(trainer), trainer.grid.cp


@pytest.mark.parametrize("extra", [
    ("parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=1"),  # + dp 2
    ("parallel.cp=2", "parallel.tp=2", "parallel.pp=2"),
], ids=["cp2-tp2-dp2-zero1", "cp2-pp2-tp2"])
def test_trainer_at_cp2_on_8_ranks_matches_one_process(tmp_path, reference, extra):
    (losses, norms, val), cache = reference
    for (got_losses, got_norms, got_val), cp in run_ranks(8, trainer_worker, str(tmp_path / "run"), str(cache),
                                                            list(extra)):
        assert cp == 2
        assert got_losses == pytest.approx(losses, rel=1e-5)
        assert got_norms == pytest.approx(norms, rel=1e-5)
        assert got_val == pytest.approx(val, rel=1e-5)


def resume_worker(rank, world, run_dir, cache, extra, steps):
    from plait.launch.env import ProcessEnv
    from plait.train import Trainer, load_config

    cfg = load_config(overrides(run_dir, cache, "train.resume=auto", *extra))
    trainer = Trainer(cfg, env=ProcessEnv(rank, 0, world, "torchrun"))
    start = trainer.step_num
    try:
        losses = [trainer.step()["loss"] for _ in range(steps)]
        trainer.save_checkpoint()
    finally:
        trainer.close()
    return start, losses


def test_cp_with_activation_offload_and_ulysses_matches_one_process(tmp_path, reference):
    """cp=2 x dp=2 (4 ranks), Ulysses attention, every block's saved activations through host memory."""
    (losses, norms, val), cache = reference
    extra = ["parallel.cp=2", "parallel.cp_mode=ulysses", "offload.backend=host", "offload.min_bytes=0",
             "offload.device_filter=all", "offload.keep_last=0"]
    for (got_losses, got_norms, got_val), cp in run_ranks(4, trainer_worker, str(tmp_path / "run"), str(cache), extra):
        assert got_losses == pytest.approx(losses, rel=1e-5)
        assert got_norms == pytest.approx(norms, rel=1e-5)
        assert got_val == pytest.approx(val, rel=1e-5)


def test_bad_context_settings_get_one_line():
    from plait.train.config import ConfigError, load_config, validate

    bad = {("parallel.cp=3", "train.seq_len=32"): "not a multiple of 6",
           ("parallel.cp=2", "parallel.cp_mode=ulysses", "model.n_heads=4", "model.n_kv_heads=1"): "ulysses scatters",
           ("parallel.cp=2", "model.dropout=0.1"): "model.dropout=0.1 with parallel.cp=2",
           ("parallel.cp=2", "parallel.cp_mode=zigzag"): "parallel.cp_mode=zigzag"}
    for overrides, message in bad.items():
        cfg = load_config(["train.batch_size=6" if "parallel.cp=3" in overrides else "train.batch_size=8",
                           *overrides])
        world = 3 if "parallel.cp=3" in overrides else 2
        with pytest.raises(ConfigError, match=message) as info:
            validate(cfg, world)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_a_checkpoint_at_one_cp_resumes_at_another(tmp_path, reference, first, second):
    """Two steps at cp=first, saved, then the third at cp=second: the one-process run's losses."""
    (losses, _, _), cache = reference
    run_dir = str(tmp_path / "run")
    results = run_ranks(first, resume_worker, run_dir, str(cache), [f"parallel.cp={first}"], 2)
    assert results[0] == (0, pytest.approx(losses[:2], rel=1e-5))
    results = run_ranks(second, resume_worker, run_dir, str(cache), [f"parallel.cp={second}"], 1)
    assert results[0] == (2, pytest.approx(losses[2:], rel=1e-5))
