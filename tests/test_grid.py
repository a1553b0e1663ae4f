"""The process grid: coordinates (tp innermost, then dp, then pp), groups, and its errors."""

import pytest
import torch
import torch.distributed as dist

from plait.parallel.grid import Grid
from plait.parallel.layout import COMBOS, DIMS, Layout, LayoutError
from tests.dist_utils import run_ranks


def test_coordinates_put_tp_innermost_then_dp_then_pp():
    layout = Layout.infer(16, tp=2, pp=2)
    assert layout.dp == 4
    for rank in range(16):
        pp_rank, dp_rank, tp_rank = (layout.coords(rank)[name] for name in ("pp", "dp", "tp"))
        assert rank == tp_rank + 2 * dp_rank + 8 * pp_rank
        assert layout.rank_of(pp=pp_rank, dp=dp_rank, tp=tp_rank) == rank
    assert layout.groups_of("tp")[:3] == [[0, 1], [2, 3], [4, 5]]
    assert layout.groups_of("dp")[0] == [0, 2, 4, 6]
    assert layout.groups_of("pp")[0] == [0, 8]
    assert layout.groups_of("pp", "tp")[0] == [0, 1, 8, 9]  # tp x pp: one model replica, for grad norms


@pytest.mark.parametrize("world, tp, pp, cp", [(8, 2, 2, 1), (12, 3, 1, 1), (6, 1, 3, 1), (1, 1, 1, 1),
                                               (16, 2, 2, 2), (12, 1, 1, 3)])
def test_each_kind_of_group_partitions_the_world(world, tp, pp, cp):
    layout = Layout.infer(world, tp, pp, cp=cp)
    dp = world // (tp * pp * cp)
    sizes = {"tp": tp, "dp": dp, "pp": pp, "cp": cp, "mp": tp * pp, "dpcp": dp * cp}
    for name, groups in layout.groups().items():
        assert sorted(r for g in groups for r in g) == list(range(world)), name
        assert {len(g) for g in groups} == {sizes[name]}, name


@pytest.mark.parametrize("world, kwargs, fragment", [
    (6, dict(tp=4), "world size 6 is not a multiple of parallel.tp x parallel.pp = 4"),
    (8, dict(tp=2, pp=3), "world size 8 is not a multiple of parallel.tp x parallel.pp = 6"),
    (8, dict(tp=2, dp=2), "parallel.dp=2 but world size 8 / (tp 2 x pp 1) = 4"),
    (8, dict(tp=0), "parallel.tp=0 must be a positive integer"),
    (8, dict(pp=-2), "parallel.pp=-2 must be a positive integer"),
    (8, dict(dp=0), "parallel.dp=0 must be a positive integer"),
    (0, dict(), "world size=0 must be a positive integer"),
])
def test_bad_layouts_say_which_setting(world, kwargs, fragment):
    with pytest.raises(LayoutError) as info:
        Layout.infer(world, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_single_process_grid_has_no_groups():
    grid = Grid.build(tp=1, pp=1)
    assert (grid.tp, grid.dp, grid.pp, grid.rank) == (1, 1, 1, 0)
    assert grid.tp_group is None and grid.dp_group is None and grid.pp_group is None and grid.mp_group is None
    with pytest.raises(LayoutError):
        Grid.build(tp=2)  # one process cannot hold two tp ranks


def grid_worker(rank, world):
    """Build several grids on the same world; sum each rank's id over each of its groups."""
    out = {}
    for tp, pp, cp in ((2, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2)):
        grid = Grid.build(tp=tp, pp=pp, cp=cp)
        sums = {}
        for name, dims in {**{name: (name,) for name in DIMS}, **COMBOS}.items():
            value = torch.tensor([float(rank)])
            group = grid.group(*dims)
            if group is not None:
                dist.all_reduce(value, group=group)
            sums[name] = float(value)
        out[(tp, pp, cp)] = dict(coords=grid.layout.coords(rank), ranks=dict(grid.group_ranks),
                                 sums=sums, backend=grid.backend, peer=grid.pp_peer(1), cp_ranks=grid.cp_ranks,
                                 grad=(grid.grad_rank, grid.grad_size))
    return out


def test_groups_on_four_gloo_ranks_join_the_right_ranks():
    results = run_ranks(4, grid_worker)
    for (tp, pp, cp) in ((2, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2)):
        layout = Layout.infer(4, tp, pp, cp=cp)
        for rank, result in enumerate(results):
            got = result[(tp, pp, cp)]
            coords = layout.coords(rank)
            assert got["cp_ranks"] == next(g for g in layout.groups_of("cp") if rank in g)
            assert got["grad"] == (coords["dp"] * cp + coords["cp"], layout.dp * cp)  # its place in dp x cp
            assert got["coords"] == layout.coords(rank)
            assert got["backend"] == "gloo"
            for name, groups in layout.groups().items():
                expected = next(g for g in groups if rank in g)
                assert got["ranks"][name] == expected
                assert got["sums"][name] == float(sum(expected)), (tp, pp, rank, name)
            coords = layout.coords(rank)
            assert got["peer"] == layout.rank_of(**{**coords, "pp": (coords["pp"] + 1) % pp})
