"""`optim=muon`: Muon for the hidden matrices, AdamW for the rest.

One process: the rule equals torch.optim.Muon (matrices) and torch.optim.AdamW (the rest), on CPU and
(marked gpu) on CUDA, where torch's fused AdamW and the bf16 iteration run on the device; a fused
weight's segments are orthogonalized each on its own, as separate projections would be. Many
processes: tp x dp, ZeRO-1 and ZeRO-3, pipeline stages each put whole matrices together from their
pieces and train as one process does; checkpoints resume exactly and load under another layout.
"""

import json

import pytest
import torch

from dist_utils import run_ranks
from train_utils import make_trainer, train_steps
from plait.optim.muon import Muon, newton_schulz
from plait.parallel.grid import Grid
from plait.parallel.matrices import ShardedMatrices
from plait.parallel.sharding import ShardSpec
from plait.train.config import ConfigError, load_config, validate

MATRICES = [(48, 32), (32, 80), (7, 13)]
VECTORS = [(32,), (100, 16)]  # a norm gain and an embedding-like matrix: AdamW's


def _tensors(shapes, device="cpu"):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=generator).to(device).requires_grad_() for shape in shapes]


def _set_grads(generator, *tensor_lists):
    """The same random gradient on the i-th tensor of every list."""
    for tensors in zip(*tensor_lists):
        grad = torch.randn(tensors[0].shape, generator=generator).to(tensors[0].device)
        for tensor in tensors:
            tensor.grad = grad.clone()


def _close_to_rounding(ours, reference):
    """Equal up to float32 rounding of the step (plait scales the orthogonal matrix, then adds; torch adds with the
    scaled learning rate as alpha): a few ulps of the weights' size."""
    return float((ours - reference).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(reference.abs().max())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_matrices_as_torch_muon_and_the_rest_as_torch_adamw(ns_dtype, adjust, nesterov, device,
                                                                       monkeypatch):
    if ns_dtype == "float32":  # torch's Muon iterates in bf16 only: give it plait's fp32 iteration to compare with
        import torch.optim._muon as torch_muon

        monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz",
                            lambda grad, coefficients, steps, eps: newton_schulz(grad, steps, torch.float32, eps))
    ours_m, ours_v = _tensors(MATRICES, device), _tensors(VECTORS, device)
    ref_m, ref_v = _tensors(MATRICES, device), _tensors(VECTORS, device)
    ours = Muon([{"params": ours_m, "muon": True, "weight_decay": 0.1}, {"params": ours_v, "weight_decay": 0.05}],
                lr=0.02, momentum=0.9, nesterov=nesterov, ns_dtype=ns_dtype, adjust_lr=adjust)
    torch_muon_opt = torch.optim.Muon(ref_m, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                                      adjust_lr_fn=adjust)
    torch_adamw = torch.optim.AdamW(ref_v, lr=0.02, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8, fused=True)
    generator = torch.Generator().manual_seed(2)
    start = [t.detach().clone() for t in ours_m]
    for _ in range(5):
        _set_grads(generator, ours_m + ours_v, ref_m + ref_v)
        ours.step()
        torch_muon_opt.step()
        torch_adamw.step()
    for mine, theirs, before in zip(ours_m, ref_m, start):
        assert not torch.equal(mine, before)
        assert _close_to_rounding(mine.detach(), theirs.detach())
    for mine, theirs in zip(ours_v, ref_v):
        assert torch.equal(mine, theirs)  # torch's own AdamW kernel, bit for bit


def test_newton_schulz_leaves_singular_values_near_one_and_the_singular_vectors_alone():
    matrix = torch.randn(64, 24, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(-1.5, 1, 24))
    result = newton_schulz(matrix, dtype=torch.float32)
    values = torch.linalg.svdvals(result)
    assert float(values.min()) > 0.6 and float(values.max()) < 1.25  # a condition number of 316 in; roughly U V^T out
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    # the same singular vectors: U^T result V is diagonal
    core = u.T @ result @ vh.T
    assert float((core - torch.diag(torch.diagonal(core))).abs().max()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["tall", "wide"])
def test_newton_schulz_leaves_its_input_alone(dtype, shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # (Muon hands it the momentum itself)
    before = matrix.clone()
    newton_schulz(matrix, dtype=dtype)
    assert torch.equal(matrix, before)


def test_a_fused_weight_orthogonalizes_each_segment_on_its_own():
    q, k, v = [t.detach() for t in _tensors([(32, 32), (16, 32), (16, 32)])]
    fused = torch.cat([q, k, v]).requires_grad_()
    separate = [t.clone().requires_grad_() for t in (q, k, v)]
    layout = ShardedMatrices({"wqkv": ShardSpec((64, 32), segments=(32, 16, 16))}, Grid.single(), False)
    ours = Muon([{"params": [fused], "names": ["wqkv"], "muon": True, "weight_decay": 0.1}], lr=0.02,
                matrices=layout, ns_dtype="float32")
    reference = torch.optim.Muon(separate, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    import torch.optim._muon as torch_muon

    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = lambda grad, c, steps, eps: newton_schulz(grad, steps, torch.float32, eps)
    try:
        generator = torch.Generator().manual_seed(3)
        for _ in range(3):
            grad = torch.randn(64, 32, generator=generator)
            fused.grad = grad.clone()
            for tensor, part in zip(separate, grad.split([32, 16, 16])):
                tensor.grad = part.clone()
            ours.step()
            reference.step()
    finally:
        torch_muon._zeropower_via_newtonschulz = original
    assert _close_to_rounding(fused.detach(), torch.cat([t.detach() for t in separate]))


SPREAD_SPECS = {"wqkv": ShardSpec((64, 32), 0, (32, 16, 16)), "wo": ShardSpec((32, 32), 1)}  # column, row


def _spread_wholes():
    generator = torch.Generator().manual_seed(7)
    return {name: torch.randn(spec.full_shape, generator=generator) for name, spec in SPREAD_SPECS.items()}


def _spread_parts(rank, world, tp):
    """(tp rank, its parts of a fused Q|K|V and an output matrix) under tp x dp (zero 0), bf16 results."""
    from plait.parallel.grid import Grid

    grid = Grid.build(tp=tp)
    layout = ShardedMatrices(SPREAD_SPECS, grid, False, torch.float32, torch.bfloat16)
    pieces = {name: (SPREAD_SPECS[name].shard(whole, grid.tp_rank, tp).contiguous(), 0)
              for name, whole in _spread_wholes().items()}
    parts = layout.orthogonalize(pieces, lambda m: newton_schulz(m, dtype=torch.bfloat16), lambda r, c: r / c)
    return grid.tp_rank, {name: [(offset, values.contiguous(), scale) for offset, values, scale in entries]
                          for name, entries in parts.items()}


@pytest.mark.parametrize("tp", [1, 2])
def test_the_spread_hands_each_rank_the_one_process_results_bit_for_bit(tp):
    """Dealt over 4 ranks and gathered back in bf16, each rank's parts are exactly what one process computes for
    its piece: each segment's Newton-Schulz result, cut to the rank's tp share, with its segment's scale."""
    wholes = _spread_wholes()
    for tp_rank, parts in run_ranks(4, _spread_parts, tp):
        for name, spec in SPREAD_SPECS.items():
            expected, at = [], 0
            for segment in wholes[name].split(list(spec.segments or (spec.full_shape[0],))):
                result = newton_schulz(segment, dtype=torch.bfloat16)
                size = result.shape[spec.dim] // tp
                share = result.narrow(spec.dim, tp_rank * size, size)
                expected.append((at, share, segment.shape[0] / segment.shape[1]))
                at += share.numel()
            assert [(o, s) for o, _, s in parts[name]] == [(o, s) for o, _, s in expected]
            for (_, got, _), (_, want, _) in zip(parts[name], expected):
                assert got.dtype == torch.bfloat16 and torch.equal(got, want)


STEPS = 3
BASE = ["optim=muon", "optim.muon_ns_dtype=float32", "model.dim=64", "model.n_layers=4", "model.n_heads=4",
        "model.n_kv_heads=2", "model.ffn_dim=96", "train.seq_len=32", "train.batch_size=8", "train.progress=false",
        "train.peak_flops=1e10", "optim.warmup_steps=1", "optim.lr=3e-3", "train.eval_every=0",
        "checkpoint.save_final=false"]
LAYOUTS = {
    # small buckets: every matrix's rows are split between the two dp ranks' ZeRO-1 slices
    "tp2+sp x dp2 zero1": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=1",
                               "parallel.bucket_mb=0.01"]),
    "pp2 interleaved x dp2 zero3": (4, ["parallel.pp=2", "parallel.vpp=2", "parallel.microbatches=4",
                                        "parallel.zero=3"]),
    "cp2 x dp2": (4, ["parallel.cp=2"]),
}


def _orthogonalizations(rank, world, base, overrides, run_dir, cache):
    """How many matrices this rank orthogonalized in one step."""
    trainer = make_trainer(rank, world, base, overrides, run_dir, cache)
    muon = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    calls, orthogonal = [], muon._orthogonal
    muon._orthogonal = lambda matrix: calls.append(matrix.shape) or orthogonal(matrix)
    trainer.step()
    trainer.close()
    return len(calls)


@pytest.mark.parametrize("overrides", [["parallel.tp=2"], ["parallel.zero=1"], ["parallel.cp=2", "parallel.zero=3"]],
                         ids=["tp2-dp2", "dp4-zero1", "cp2-dp2-zero3"])
def test_each_matrix_is_orthogonalized_once_over_the_ranks(overrides, reference, tmp_path):
    """4 layers x (Q, K, V, O, gate, up, down) = 28 matrices, dealt over the 4 ranks: 7 each, none twice."""
    _, cache = reference
    counts = run_ranks(4, _orthogonalizations, BASE, overrides, tmp_path, cache)
    assert sum(counts) == 28 and max(counts) <= 9, counts


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    return train_steps(0, 1, BASE, [], tmp_path_factory.mktemp("one"), cache, STEPS), cache


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_muon_under_tp_dp_zero_and_pipelines_trains_as_one_process(layout, reference, tmp_path):
    (losses, norms, val), cache = reference
    adamw = train_steps(0, 1, BASE, ["optim=adamw"], tmp_path / "adamw", cache, STEPS)
    assert abs(adamw[0][-1] - losses[-1]) > 1e-3  # Muon's steps are not AdamW's
    world, overrides = LAYOUTS[layout]
    for rank_losses, rank_norms, rank_val in run_ranks(world, train_steps, BASE, overrides, tmp_path / "many", cache,
                                                       STEPS):
        assert rank_losses == pytest.approx(losses, rel=1e-5)
        assert rank_norms == pytest.approx(norms, rel=1e-5)
        assert rank_val == pytest.approx(val, rel=1e-5)


def _save_then_resume(rank, world, base, first, then, run_dir, cache):
    """Train 2 steps under `first` (saving), then resume under `then` to step 4; the resumed losses."""
    if first is not None:
        trainer = make_trainer(rank, world, base, first + ["train.steps=4"], run_dir, cache)
        [trainer.step() for _ in range(2)]
        trainer.save_checkpoint()
        trainer.close()
        return None
    trainer = make_trainer(rank, world, base, then + ["train.steps=4", "train.resume=auto"], run_dir, cache)
    losses = [trainer.step()["loss"] for _ in range(2)]
    trainer.close()
    return losses


def test_muon_state_saves_under_zero1_and_resumes_in_one_process(reference, tmp_path):
    _, cache = reference
    straight = train_steps(0, 1, BASE, ["train.steps=4"], tmp_path / "straight", cache, 4, eval_batches=0)[0]
    run_dir = tmp_path / "run"
    run_ranks(4, _save_then_resume, BASE, ["parallel.tp=2", "parallel.zero=1", "parallel.bucket_mb=0.01"], None,
              run_dir, cache)
    index = json.loads(next((run_dir / "checkpoints").glob("step-*/index.json")).read_text())
    keys = {name: sorted(entry["keys"]) for name, entry in index["optimizer_state"].items()}
    # Muon's matrices hold their momentum only; AdamW's tensors their two moments and the step count
    assert keys["layers.0.attn.wqkv.weight"] == keys["layers.3.mlp.w2.weight"] == ["momentum_buffer"]
    assert keys["embed.weight"] == keys["norm.weight"] == ["exp_avg", "exp_avg_sq", "step"]
    resumed = _save_then_resume(0, 1, BASE, None, [], run_dir, cache)
    assert resumed == pytest.approx(straight[2:], rel=1e-5)


def test_muon_resumes_bit_for_bit_in_one_process(reference, tmp_path):
    _, cache = reference
    straight = train_steps(0, 1, BASE + ["optim.muon_ns_dtype=bfloat16"], ["train.steps=4"], tmp_path / "straight",
                           cache, 4, eval_batches=0)[0]
    base = BASE + ["optim.muon_ns_dtype=bfloat16"]
    _save_then_resume(0, 1, base, [], None, tmp_path / "run", cache)
    assert _save_then_resume(0, 1, base, None, [], tmp_path / "run", cache) == straight[2:]


def test_muon_lr_sets_the_matrices_peak_and_adamw_keeps_optim_lr(reference, tmp_path):
    """Keller Jordan's recipe: optim.muon_adjust_lr=original with optim.muon_lr=0.02 for the matrices while AdamW
    keeps optim.lr; both follow the one schedule."""
    from plait.optim.schedule import lr_factor
    from plait.train import Trainer

    _, cache = reference
    cfg = load_config(BASE + ["optim.muon_adjust_lr=original", "optim.muon_lr=0.02", "optim.lr=1e-3",
                              "optim.warmup_steps=4", f"train.run_dir={tmp_path}", f"data.cache_dir={cache}"])
    trainer = Trainer(cfg)
    trainer.step()
    trainer.step()
    factor = lr_factor(1, cfg.train.steps, cfg.optim)
    lrs = {group["muon"]: group["lr"] for group in trainer.optimizer.param_groups}
    trainer.close()
    assert lrs[True] == pytest.approx(0.02 * factor, rel=1e-12) and lrs[False] == pytest.approx(1e-3 * factor)


@pytest.mark.parametrize("override,setting", [
    (["optim=muon", "optim.mup=true"], "optim.mup=true"),
    (["optim=muon", "optim.muon_momentum=1.0"], "optim.muon_momentum=1.0"),
    (["optim=muon", "optim.muon_ns_dtype=fp8"], "optim.muon_ns_dtype=fp8"),
    (["optim=muon", "optim.muon_adjust_lr=none"], "optim.muon_adjust_lr=none"),
    (["optim=muon", "optim.muon_ns_steps=0"], "optim.muon_ns_steps=0"),
    (["optim=muon", "optim.muon_lr=-1"], "optim.muon_lr=-1"),
])
def test_bad_muon_settings_are_refused_in_one_sentence(override, setting):
    with pytest.raises(ConfigError, match=rf"^{setting}"):
        validate(load_config(override))
