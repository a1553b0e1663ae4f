"""Every private torch name plait touches (plait.common.compat) still exists and still does its job.

If one of these fails after a torch upgrade, the name moved: fix `common/compat.py`, nothing else.
"""

import torch

from plait.common import compat


def test_engine_backward_runs_from_an_output_whose_data_was_freed():
    x = torch.randn(3, 4, requires_grad=True)
    out = (x * 2).sum(dim=1)
    out.data = torch.empty(0)  # what the pipeline runtime does to a sent output
    compat.run_backward(out, torch.ones(3))
    assert torch.equal(x.grad, torch.full((3, 4), 2.0))


def test_inductor_fma_rounds_once_when_compiled_as_eager_add_does():
    fma = compat.inductor_fma()
    assert fma is not None, "torch._inductor.inductor_prims.fma moved"
    x, y, z = torch.tensor([1.0 + 2**-23]), torch.tensor([1.0 - 2**-23]), torch.tensor([-1.0])
    compiled = torch.compile(lambda a, b, c: fma(a, b, c), fullgraph=True)
    assert float(compiled(x, y, z)) == -(2**-46)  # one rounding keeps the tiny term; x * y + z loses it
    assert float(x * y + z) == 0.0
    assert float(z.clone().add_(x, alpha=float(y))) == -(2**-46)  # the eager rule the compiled kernel matches


def test_group_timeout_of_a_gloo_group_read_and_set(tmp_path):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=123))
    try:
        assert compat.group_timeout_s(dist.group.WORLD) == 123.0
        extra = dist.new_group([0])
        assert set(compat.process_groups()) == {dist.group.WORLD, extra}
        for group in compat.process_groups():  # (parallel.train_timeout_s after the first step)
            compat.set_group_timeout(group, 9)
            assert compat.group_timeout_s(group) == 9.0
    finally:
        dist.destroy_process_group()
    assert compat.group_timeout_s(object(), default=7.0) == 7.0


def test_param_cast_is_recognised_and_activations_are_not():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = weight.to(torch.bfloat16)
    activation = (weight * 2).to(torch.bfloat16)
    assert compat.is_param_cast(cast)
    assert not compat.is_param_cast(activation) and not compat.is_param_cast(torch.randn(2))


def test_cpu_flash_attention_returns_the_log_sum_exp_and_takes_it_back():
    from plait.common.compat import cpu_flash_attention

    kernels = cpu_flash_attention()
    assert kernels is not None, "aten's CPU flash attention moved: ring attention falls back to its slower math"
    forward, backward = kernels
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    out, lse = forward(q.detach(), k.detach(), v.detach(), True, 0.5)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).detach())
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(out, expected.detach())
    out_grad = torch.randn_like(out)
    expected.backward(out_grad)
    for got, want in zip(backward(out_grad, q.detach(), k.detach(), v.detach(), out, lse, True, 0.5),
                         (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want)


def _flat_mesh_ranks(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    flat = compat.flat_mesh(mesh, ("dp", "cp"))
    return flat.size(), flat.get_local_rank(), mesh.get_local_rank("dp") * 2 + mesh.get_local_rank("cp")


def test_flat_mesh_joins_two_dimensions_in_row_major_order():
    from dist_utils import run_ranks

    for size, flat_rank, row_major in run_ranks(4, _flat_mesh_ranks):
        assert size == 4 and flat_rank == row_major


def test_fsdp_reduce_pending_moves_a_held_whole_grad_into_the_shard(tmp_path):
    """A grad FSDP2 kept whole (its hook did not reduce it) lands in the sharded parameter's grad once
    `fsdp_reduce_pending` has run FSDP2's post-backward by hand (a one-rank world: the shard is the whole)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 3, bias=False)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        x = torch.randn(5, 4)
        model.set_requires_gradient_sync(False)  # the hook keeps the grad whole, as at a split backward's I
        model(x).sum().backward()
        model.set_requires_gradient_sync(True)
        held_back = model.weight.grad is None
        compat.fsdp_reduce_pending(model)
        grad = model.weight.grad.to_local()
    finally:
        dist.destroy_process_group()
    assert held_back
    expected = torch.ones(5, 3).T @ x  # d(sum(x W^T))/dW
    torch.testing.assert_close(grad, expected)
