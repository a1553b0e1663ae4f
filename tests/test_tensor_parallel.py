"""Tensor-parallel mappings, layers, loss and model against a dense single-process reference.

One spawn per world size (2 and 4 gloo ranks) runs every check; each rank computes the
dense reference itself from the same seeded full tensors and compares its shard, so a
wrong slice, a missing or extra reduction, or a wrong mask shows up as a relative error
far above 1e-5. The parent asserts every returned error by name.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.dist_utils import run_ranks

TOL = 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def full_randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def seq_shard(x: torch.Tensor, grid) -> torch.Tensor:
    return x.chunk(grid.tp, dim=1)[grid.tp_rank]


def last_shard(x: torch.Tensor, grid, segments=None) -> torch.Tensor:
    from plait.parallel.sharding import ShardSpec

    return ShardSpec(tuple(x.shape), x.dim() - 1, segments).shard(x, grid.tp_rank, grid.tp)


# checks (run inside each rank) -----------------------------------------------------------
def check_mappings(grid, errors):
    """Each region mapping moves exactly what its docstring says, forward and backward."""
    from plait.parallel import tensor as T

    group = grid.tp_group
    b, s, h = 2, 4 * grid.tp, 6 * grid.tp
    full = full_randn(b, s, h, seed=1)
    per_rank = [full_randn(b, s, h, seed=10 + r) for r in range(grid.tp)]  # a different tensor on each rank
    mine, total = per_rank[grid.tp_rank], sum(per_rank)
    grad_full = full_randn(b, s, h, seed=2)
    grads = [full_randn(b, s, h, seed=20 + r) for r in range(grid.tp)]
    grad_mine, grad_total = grads[grid.tp_rank], sum(grads)

    def run(function, x, grad):
        x = x.clone().requires_grad_(True)
        y = function.apply(x, group)
        y.backward(grad)
        return y.detach(), x.grad

    y, g = run(T.CopyToRegion, full, grad_mine)
    errors["copy_to_region.fwd"] = rel_err(y, full)
    errors["copy_to_region.bwd"] = rel_err(g, grad_total)
    y, g = run(T.ReduceFromRegion, mine, grad_full)
    errors["reduce_from_region.fwd"] = rel_err(y, total)
    errors["reduce_from_region.bwd"] = rel_err(g, grad_full)
    y, g = run(T.ScatterToRegion, full, last_shard(grad_full, grid))
    errors["scatter_to_region.fwd"] = rel_err(y, last_shard(full, grid))
    errors["scatter_to_region.bwd"] = rel_err(g, grad_full)
    y, g = run(T.GatherFromRegion, last_shard(full, grid), grad_full)
    errors["gather_from_region.fwd"] = rel_err(y, full)
    errors["gather_from_region.bwd"] = rel_err(g, last_shard(grad_full, grid))
    y, g = run(T.ScatterToSequence, full, seq_shard(grad_full, grid))
    errors["scatter_to_sequence.fwd"] = rel_err(y, seq_shard(full, grid))
    errors["scatter_to_sequence.bwd"] = rel_err(g, grad_full)
    y, g = run(T.GatherFromSequence, seq_shard(full, grid), grad_mine)
    errors["gather_from_sequence.fwd"] = rel_err(y, full)
    errors["gather_from_sequence.bwd"] = rel_err(g, seq_shard(grad_total, grid))
    y, g = run(T.ReduceScatterToSequence, mine, seq_shard(grad_full, grid))
    errors["reduce_scatter_to_sequence.fwd"] = rel_err(y, seq_shard(total, grid))
    errors["reduce_scatter_to_sequence.bwd"] = rel_err(g, grad_full)


def check_column(grid, sp, errors, overlap=False):
    """Column-parallel linear (fused two-segment weight, bias) vs F.linear on the full weight; with `overlap`
    as one autograd node (parallel/column_overlap.py)."""
    from plait.parallel.tensor import ColumnParallelLinear

    b, s, d_in, seg = 2, 2 * grid.tp, 12, 4 * grid.tp
    layer = ColumnParallelLinear(d_in, 2 * seg, grid, bias=True, sequence_parallel=sp, segments=(seg, seg),
                                 overlap=overlap)
    weight, bias = full_randn(2 * seg, d_in, seed=3), full_randn(2 * seg, seed=4)
    with torch.no_grad():
        layer.weight.copy_(layer.spec.shard(weight, grid.tp_rank, grid.tp))
        layer.bias.copy_(layer.bias_spec.shard(bias, grid.tp_rank, grid.tp))
    x, grad = full_randn(b, s, d_in, seed=5), full_randn(b, s, 2 * seg, seed=6)
    ref_x, ref_w, ref_b = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    ref_y = F.linear(ref_x, ref_w, ref_b)
    ref_y.backward(grad)
    local_x = (seq_shard(x, grid) if sp else x).clone().requires_grad_(True)
    y = layer(local_x)
    y.backward(last_shard(grad, grid, (seg, seg)))
    tag = f"column{'.sp' if sp else ''}{'.overlap' if overlap else ''}"
    errors[f"{tag}.out"] = rel_err(y, last_shard(ref_y.detach(), grid, (seg, seg)))
    errors[f"{tag}.grad_in"] = rel_err(local_x.grad, seq_shard(ref_x.grad, grid) if sp else ref_x.grad)
    errors[f"{tag}.grad_w"] = rel_err(layer.weight.grad, layer.spec.shard(ref_w.grad, grid.tp_rank, grid.tp))
    errors[f"{tag}.grad_b"] = rel_err(layer.bias.grad, layer.bias_spec.shard(ref_b.grad, grid.tp_rank, grid.tp))
    if overlap:  # its segments' outputs, each used alone (the other's grad is zero), as the mappings path's
        x = local_x.detach().clone().requires_grad_(True)
        first, _ = layer.forward_segments(x)
        first.sum().backward()
        full_first = F.linear(ref_x.detach(), weight[:seg], bias[:seg])
        errors[f"{tag}.segment.out"] = rel_err(first, last_shard(full_first, grid))
        ref_x.grad = None
        F.linear(ref_x, weight[:seg]).sum().backward()
        errors[f"{tag}.segment.grad_in"] = rel_err(x.grad, seq_shard(ref_x.grad, grid) if sp else ref_x.grad)


def check_overlap_under_autocast(grid, sp, errors):
    """Under bf16 autocast the overlapped layer gives the mappings path's outputs and grads in the same dtypes,
    and keeps only the bf16 cast of its input shard (it casts before the gather, keeps 1/tp of it under SP and
    casts the weight again in backward); the mappings path keeps each segment's own bf16 cast of the (gathered)
    input and of its weight rows."""
    from plait.parallel.tensor import ColumnParallelLinear
    from tests.memory_utils import saved_activation_bytes

    b, s, d_in, seg = 2, 4 * grid.tp, 16, 4 * grid.tp
    layers = [ColumnParallelLinear(d_in, 3 * seg, grid, sequence_parallel=sp, segments=(seg,) * 3, overlap=overlap)
              for overlap in (False, True)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(last_shard(full_randn(d_in, 3 * seg, seed=30), grid, (seg,) * 3).t())
    x = full_randn(b, s // (grid.tp if sp else 1), d_in, seed=31)
    results, saved = [], []
    for layer in layers:
        local_x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved.append(saved_activation_bytes(layer, lambda: layer(local_x, segmented=True)))
            outs = layer(local_x, segmented=True)
        sum(out.float().square().sum() for out in outs).backward()
        results.append((torch.cat(outs, -1), local_x.grad, layer.weight.grad))
    tag = f"autocast{'.sp' if sp else ''}"
    for name, mapped, overlapped in zip(("out", "grad_in", "grad_w"), *results):
        errors[f"{tag}.{name}.dtype_same"] = float(mapped.dtype == overlapped.dtype)
        errors[f"{tag}.{name}"] = rel_err(overlapped.float(), mapped.float()) / 1e3  # bf16: 1e-2 passes
    errors[f"{tag}.overlap_saved_exact"] = float(saved[1] == x.numel() * 2)
    errors[f"{tag}.mapped_saved_exact"] = float(saved[0] == 3 * (b * s * d_in + seg // grid.tp * d_in) * 2)


def check_regather_bytes(grid, errors):
    """A block under SP with `tp_overlap` keeps exactly the plan's bytes fewer than without: each column-parallel
    layer's gathered input, but for this rank's shard (train/plan.py's `regather`)."""
    from plait.parallel.plans import parallelize
    from plait.train.build import llama_plan
    from plait.train.config import ModelConfig
    from plait.train.model import Transformer
    from plait.train.plan import block_activation_elements
    from tests.memory_utils import saved_activation_bytes

    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=8, n_kv_heads=4, ffn_dim=48, max_seq_len=32)
    b, s = 2, 8 * grid.tp
    x = full_randn(b, s // grid.tp, cfg.dim, seed=40).requires_grad_(True)
    kept = {}
    for overlap in (False, True):
        torch.manual_seed(0)
        block = parallelize(Transformer(cfg, layers=[0], has_embedding=False, has_head=False), grid,
                            llama_plan(tp_overlap=overlap), sequence_parallel=True)
        kept[overlap] = saved_activation_bytes(block, lambda: block(x))
    planned = [4 * block_activation_elements(cfg, b * s, grid.tp, True, regather) for regather in (False, True)]
    errors["regather.bytes_saved_exact"] = float(kept[False] - kept[True] == planned[0] - planned[1] > 0)


def check_row(grid, sp, errors):
    """Row-parallel linear (bias) vs F.linear; under SP the bias grad is summed over tp afterwards."""
    from plait.parallel.tensor import RowParallelLinear, allreduce_partial_grads

    b, s, d_in, d_out = 2, 2 * grid.tp, 4 * grid.tp, 10
    layer = RowParallelLinear(d_in, d_out, grid, bias=True, sequence_parallel=sp)
    weight, bias = full_randn(d_out, d_in, seed=7), full_randn(d_out, seed=8)
    with torch.no_grad():
        layer.weight.copy_(layer.spec.shard(weight, grid.tp_rank, grid.tp))
        layer.bias.copy_(bias)
    x, grad = full_randn(b, s, d_in, seed=9), full_randn(b, s, d_out, seed=10)
    ref_x, ref_w, ref_b = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    ref_y = F.linear(ref_x, ref_w, ref_b)
    ref_y.backward(grad)
    local_x = last_shard(x, grid).clone().requires_grad_(True)
    y = layer(local_x)
    y.backward(seq_shard(grad, grid) if sp else grad)
    if layer.bias_spec.tp_partial_grad:
        allreduce_partial_grads([layer.bias], grid)
    tag = f"row{'.sp' if sp else ''}"
    errors[f"{tag}.out"] = rel_err(y, seq_shard(ref_y.detach(), grid) if sp else ref_y.detach())
    errors[f"{tag}.grad_in"] = rel_err(local_x.grad, last_shard(ref_x.grad, grid))
    errors[f"{tag}.grad_w"] = rel_err(layer.weight.grad, layer.spec.shard(ref_w.grad, grid.tp_rank, grid.tp))
    errors[f"{tag}.grad_b"] = rel_err(layer.bias.grad, ref_b.grad)


def check_embedding(grid, sp, errors):
    """Vocab-parallel embedding with a padded vocabulary vs F.embedding on the full table."""
    from plait.parallel.tensor import VocabParallelEmbedding

    vocab, dim, b, s = 4 * grid.tp + 1, 8, 3, 2 * grid.tp
    padded = vocab + (-vocab) % grid.tp
    layer = VocabParallelEmbedding(vocab, padded, dim, grid, sequence_parallel=sp)
    table = torch.cat([full_randn(vocab, dim, seed=11), torch.zeros(padded - vocab, dim)])
    with torch.no_grad():
        layer.weight.copy_(layer.spec.shard(table, grid.tp_rank, grid.tp))
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(12))
    ids[0, :2] = torch.tensor([0, vocab - 1])  # both ends of the range
    grad = full_randn(b, s, dim, seed=13)
    ref_w = table.clone().requires_grad_(True)
    ref_y = F.embedding(ids, ref_w)
    ref_y.backward(grad)
    y = layer(ids)
    y.backward(seq_shard(grad, grid) if sp else grad)
    tag = f"embedding{'.sp' if sp else ''}"
    errors[f"{tag}.out"] = rel_err(y, seq_shard(ref_y.detach(), grid) if sp else ref_y.detach())
    errors[f"{tag}.grad_w"] = rel_err(layer.weight.grad, layer.spec.shard(ref_w.grad, grid.tp_rank, grid.tp))


def check_cross_entropy(grid, errors):
    """vocab_parallel_cross_entropy == F.cross_entropy, with and without padded columns, and with PaLM's z-loss
    (z x logsumexp^2, whose lse spans every shard's columns) against its formula through autograd.

    Padded columns hold large garbage values: unmasked, they would dominate the softmax.
    """
    from plait.parallel.tensor import vocab_parallel_cross_entropy

    b, s = 3, 5
    for vocab, z in ((8 * grid.tp, 0.0), (8 * grid.tp - 3, 0.0), (8 * grid.tp - 3, 0.05)):
        padded = 8 * grid.tp
        logits = full_randn(b, s, vocab, seed=14) * 3
        targets = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(15))
        targets[0, 0], targets[0, 1] = 0, vocab - 1
        ref_logits = logits.clone().requires_grad_(True)
        ref = F.cross_entropy(ref_logits.reshape(-1, vocab), targets.reshape(-1))
        ref = ref + z * torch.logsumexp(ref_logits, dim=-1).square().mean()
        ref.backward()
        full = torch.cat([logits, torch.full((b, s, padded - vocab), 50.0)], dim=-1)
        local = last_shard(full, grid).clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(local, targets, grid, vocab, z_loss=z).mean()
        loss.backward()
        ref_grad = torch.cat([ref_logits.grad, torch.zeros(b, s, padded - vocab)], dim=-1)
        tag = f"cross_entropy.v{vocab}.z{z}"
        errors[f"{tag}.loss"] = rel_err(loss.detach(), ref.detach())
        errors[f"{tag}.grad"] = rel_err(local.grad, last_shard(ref_grad, grid))


def check_model(grid, sp, errors, **model_kw):
    """The whole decoder (GQA, padded vocab, optionally tied) vs the same model in one process.

    Logits, loss, input-embedding-output grads and every parameter grad (this rank's shard
    of the reference's, padding rows zero) must match.
    """
    from plait.parallel.grid import Grid
    from plait.parallel.tensor import allreduce_partial_grads
    from plait.train.config import ModelConfig
    from plait.parallel.plans import param_specs
    from plait.train.build import build_model

    overlap = model_kw.pop("tp_overlap", False)
    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=8, n_kv_heads=model_kw.pop("kv", 8),
                      ffn_dim=48, max_seq_len=32, **model_kw)
    ids = torch.randint(0, 300, (2, 8 * grid.tp + 1), generator=torch.Generator().manual_seed(16))
    reference = build_model(cfg, Grid.single(), seed=5)
    model = build_model(cfg, grid, seed=5, sequence_parallel=sp, tp_overlap=overlap)
    ref_logits = reference(ids[:, :-1])
    reference.loss(ref_logits, ids[:, 1:]).backward()
    logits = model(ids[:, :-1])
    loss = model.loss(logits, ids[:, 1:])
    loss.backward()
    specs = param_specs(model)
    allreduce_partial_grads([p for n, p in model.named_parameters() if specs[n].tp_partial_grad], grid)
    tag = (f"model{'.sp' if sp else ''}{'.tied' if cfg.tie_embeddings else ''}{'.dropout' if cfg.dropout else ''}"
           f".kv{cfg.n_kv_heads}{'.overlap' if overlap else ''}")
    ref_loss = reference.loss(ref_logits.detach(), ids[:, 1:])
    errors[f"{tag}.loss"] = rel_err(loss.detach(), ref_loss)
    padded_logits = torch.zeros(ref_logits.shape[:-1] + (model.vocab,))  # padding columns are 0 in both
    padded_logits[..., :300] = ref_logits.detach()[..., :300]
    errors[f"{tag}.logits"] = rel_err(logits.detach(), last_shard(padded_logits, grid))
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        spec = specs[name]
        ref_grad = ref_params[name].grad
        if ref_grad.shape != spec.full_shape:  # vocab padding differs with tp: pad with zero rows
            ref_grad = torch.cat([ref_grad[:300], torch.zeros((spec.full_shape[0] - 300,) + spec.full_shape[1:])])
        errors[f"{tag}.grad.{name}"] = rel_err(param.grad, spec.shard(ref_grad, grid.tp_rank, grid.tp))


def check_dropout_streams(grid, errors):
    """Replicated stream: the same mask on every tp rank; sharded stream: different masks."""
    from plait.parallel.random import ParallelRNG

    rng = ParallelRNG(7, grid)
    ones = torch.ones(64)
    for sharded in (False, True):
        mask = rng.dropout(ones, 0.5, sharded)
        masks = [torch.empty_like(mask) for _ in range(grid.tp)]
        dist.all_gather(masks, mask, group=grid.tp_group)
        same = all(torch.equal(m, masks[0]) for m in masks)
        errors[f"dropout.{'sharded' if sharded else 'replicated'}.same_over_tp"] = float(same)


def check_no_comm_at_tp1(rank, world, errors):
    """A tp=1 grid (dp = world) runs layers, model and loss with no collective at all."""
    from plait.parallel.grid import Grid

    grid = Grid.build(tp=1)
    calls = []
    originals = {name: getattr(dist, name) for name in
                 ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                  "reduce_scatter_tensor", "all_gather")}
    from plait.common import collectives as T

    module_originals = {"all_gather_tensor": T.all_gather_tensor, "reduce_scatter_tensor": T.reduce_scatter_tensor}
    try:
        for name, fn in originals.items():
            setattr(dist, name, lambda *a, _n=name, **k: calls.append(_n))
        for name in module_originals:
            setattr(T, name, lambda *a, _n=name, **k: calls.append(_n))
        scratch = {}
        check_model(grid, True, scratch)
        check_model(grid, False, scratch)
        check_cross_entropy(grid, scratch)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        for name, fn in module_originals.items():
            setattr(T, name, fn)
    errors["tp1.collectives"] = float(len(calls))
    errors["tp1.model_matches"] = max(v for k, v in scratch.items())


def layers_worker(rank, world):
    from plait.parallel.grid import Grid

    errors = {}
    grid = Grid.build(tp=world)
    check_mappings(grid, errors)
    for sp in (False, True):
        check_column(grid, sp, errors)
        check_column(grid, sp, errors, overlap=True)
        check_overlap_under_autocast(grid, sp, errors)
        check_row(grid, sp, errors)
        check_embedding(grid, sp, errors)
        check_model(grid, sp, errors, kv=4)
        check_model(grid, sp, errors, kv=4, tp_overlap=True)
    check_model(grid, True, errors, kv=8, tie_embeddings=True)
    check_model(grid, True, errors, kv=8, tie_embeddings=True, tp_overlap=True)
    check_regather_bytes(grid, errors)
    # Without SP, residual dropout acts on replicated activations and draws from the replicated
    # stream, whose seed does not depend on tp: the masks, hence loss and grads, equal one process.
    check_model(grid, False, errors, kv=4, dropout=0.2)
    check_cross_entropy(grid, errors)
    check_dropout_streams(grid, errors)
    if world == 2:
        check_no_comm_at_tp1(rank, world, errors)
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_layers_match_dense_reference(world):
    for rank, errors in enumerate(run_ranks(world, layers_worker)):
        flags = {k: v for k, v in errors.items()
                 if k.startswith(("dropout.", "tp1.collectives")) or k.endswith(("dtype_same", "saved_exact"))}
        numbers = {k: v for k, v in errors.items() if k not in flags}
        bad = {k: v for k, v in numbers.items() if not v < TOL}
        assert not bad, f"rank {rank}: relative errors over {TOL}: {bad}"
        assert flags["dropout.replicated.same_over_tp"] == 1.0, "replicated dropout masks differ over tp"
        assert flags["dropout.sharded.same_over_tp"] == 0.0, "sharded dropout masks are equal over tp"
        if world == 2:
            assert flags["tp1.collectives"] == 0.0, "tp=1 layers communicated"
        assert not {k: v for k, v in flags.items() if k.endswith(("dtype_same", "saved_exact")) and v != 1.0}
        assert len(numbers) > 60  # every check ran
