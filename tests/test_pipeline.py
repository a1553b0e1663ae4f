"""Pipeline parallelism: schedules as data (validator, simulator), and the runtime against one process."""

import os
import tempfile
import weakref

import pytest
import torch

from plait.parallel.pipeline.partition import chunk_plan, rank_chunk_plans
from plait.parallel.pipeline.schedule import Action, Kind, ScheduleError, build_schedule, check_microbatches
from plait.parallel.pipeline.simulate import peak_live_microbatches, simulate, validate
from tests.dist_utils import run_ranks

# schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16), (3, 5), (8, 8)])
def test_one_f_one_b_and_gpipe_bubble(pp, m):
    for name in ("1f1b", "gpipe"):
        actions = build_schedule(name, pp, 1, m)
        validate(actions, pp, 1, m)
        timeline = simulate(actions, 1.0, 2.0)
        assert timeline.bubble_fraction == pytest.approx((pp - 1) / m)
        assert timeline.step_time == pytest.approx(3.0 * (m + pp - 1))


@pytest.mark.parametrize("pp,v,m", [(2, 2, 4), (2, 2, 8), (4, 2, 8), (4, 2, 16), (4, 4, 8), (3, 3, 6), (2, 3, 2)])
def test_interleaved_bubble(pp, v, m):
    actions = build_schedule("1f1b", pp, v, m)  # 1f1b with vpp > 1 interleaves
    validate(actions, pp, v, m)
    timeline = simulate(actions, 1.0 / v, 2.0 / v)  # a chunk is 1/v of a rank's layers
    assert timeline.bubble_fraction == pytest.approx((pp - 1) / (v * m))


@pytest.mark.parametrize("pp", range(2, 9))
def test_interleaved_takes_any_microbatch_count(pp):
    """m not a multiple of p: groups of at least p micro-batches, the larger first; the bubble
    stays (p-1)/(v m) for every m >= p, and each rank holds 2(p - r - 1) + (v - 1) g + 1
    chunk-forwards at its peak (g: the first group's size; Megatron's count with g = p)."""
    from plait.parallel.pipeline.schedule import microbatch_groups

    for v in (2, 3, 4):
        for m in range(1, 3 * pp + 2):
            actions = build_schedule("1f1b", pp, v, m)
            validate(actions, pp, v, m)
            groups = microbatch_groups(pp, m)
            assert sum(groups) == m and groups == sorted(groups, reverse=True)
            assert min(groups) >= pp or groups == [m]
            bubble = simulate(actions, 1.0 / v, 2.0 / v).bubble_fraction
            if m >= pp:
                assert bubble == pytest.approx((pp - 1) / (v * m)), (v, m)
            else:  # one group shorter than the ring: chunks wait, as 1F1B's does with m < p
                assert (pp - 1) / (v * m) < bubble <= simulate(build_schedule("1f1b", pp, 1, m)).bubble_fraction + 1e-9
            peaks = [peak_live_microbatches(a) for a in actions]
            assert peaks == [min(v * m, 2 * (pp - r - 1) + (v - 1) * groups[0] + 1) for r in range(pp)], (v, m)
    assert microbatch_groups(4, 8) == [4, 4] and microbatch_groups(4, 13) == [5, 4, 4]
    assert microbatch_groups(4, 3) == [3]


def test_interleaved_with_a_short_last_group_stalls_or_deadlocks():
    """Why the remainder is spread: groups of p with a last one shorter than p wait on the ring."""
    from plait.parallel.pipeline.schedule import _interleaved, lower, stage_ranks

    def built(pp, v, m, sizes):
        return [lower(_interleaved(r, pp, v, m, sizes), stage_ranks(pp, v)) for r in range(pp)]

    spread = simulate(built(4, 2, 9, [5, 4]), 0.5, 1.0).bubble_fraction
    short_last = simulate(built(4, 2, 9, [4, 4, 1]), 0.5, 1.0).bubble_fraction
    assert spread == pytest.approx(3 / 18) and short_last > 2 * spread
    with pytest.raises(ScheduleError, match="deadlocks"):
        validate(built(4, 3, 5, [4, 1]), 4, 3, 5)
    validate(built(4, 3, 5, [5]), 4, 3, 5)


def test_simulated_step_times_match_the_reference_measurements():
    # references.md: torch's simulator gives 660 ms (1F1B) and 570 ms (interleaved) for T=10 ms, 2 blocks per rank
    assert simulate(build_schedule("1f1b", 4, 1, 8), 20.0, 40.0).step_time == pytest.approx(660.0)
    assert simulate(build_schedule("interleaved", 4, 2, 8), 10.0, 20.0).step_time == pytest.approx(570.0)


def test_peak_live_microbatches_from_the_lists():
    for pp, m in ((4, 8), (2, 4)):
        one_f_one_b = build_schedule("1f1b", pp, 1, m)
        assert [peak_live_microbatches(a) for a in one_f_one_b] == [pp - r for r in range(pp)]
        assert max(peak_live_microbatches(a) for a in build_schedule("gpipe", pp, 1, m)) == m


def _swap(actions, rank, first, second):
    broken = [list(a) for a in actions]
    i, j = broken[rank].index(first), broken[rank].index(second)
    broken[rank][i], broken[rank][j] = broken[rank][j], broken[rank][i]
    return broken


def test_validator_rejects_a_backward_before_its_forward():
    actions = build_schedule("gpipe", 2, 1, 4)
    broken = _swap(actions, 1, Action(Kind.F, 0, 1), Action(Kind.B, 0, 1))
    with pytest.raises(ScheduleError, match="before its forward"):
        validate(broken, 2, 1, 4)


def test_validator_rejects_a_send_without_its_receive():
    actions = build_schedule("1f1b", 2, 1, 4)
    broken = [list(a) for a in actions]
    broken[1].remove(Action(Kind.RECV_F, 2, 1))
    with pytest.raises(ScheduleError, match="no matching receive"):
        validate(broken, 2, 1, 4)


def test_validator_rejects_a_deadlock():
    # rank 0 waits for micro-batch 0's grad before sending micro-batch 1 forward; rank 1 needs
    # micro-batch 1's activations before it runs micro-batch 0's backward (GPipe order)
    actions = build_schedule("1f1b", 2, 1, 4)
    actions[1] = build_schedule("gpipe", 2, 1, 4)[1]
    broken = [list(a) for a in actions]
    zero = broken[0]
    zero.remove(Action(Kind.F, 1, 0))
    zero.remove(Action(Kind.SEND_F, 1, 0))
    index = zero.index(Action(Kind.B, 0, 0)) + 1
    zero[index:index] = [Action(Kind.F, 1, 0), Action(Kind.SEND_F, 1, 0)]
    with pytest.raises(ScheduleError, match="deadlocks"):
        validate(broken, 2, 1, 4)


def test_validator_rejects_missing_and_misplaced_computes():
    actions = build_schedule("1f1b", 2, 1, 4)
    missing = [list(a) for a in actions]
    missing[0].remove(Action(Kind.B, 3, 0))
    with pytest.raises(ScheduleError, match="exactly once"):
        validate(missing, 2, 1, 4)
    moved = [list(a) for a in actions]
    moved[0].append(moved[1].pop(moved[1].index(Action(Kind.B, 3, 1))))
    with pytest.raises(ScheduleError, match="belongs to rank 1"):
        validate(moved, 2, 1, 4)


def test_validator_rejects_messages_out_of_order():
    actions = build_schedule("1f1b", 2, 1, 4)
    broken = _swap(actions, 1, Action(Kind.RECV_F, 0, 1), Action(Kind.RECV_F, 1, 1))
    with pytest.raises(ScheduleError, match="keep their order"):
        validate(broken, 2, 1, 4)


def test_validator_rejects_a_forward_before_its_receive():
    actions = build_schedule("1f1b", 2, 1, 4)
    broken = _swap(actions, 1, Action(Kind.RECV_F, 0, 1), Action(Kind.F, 0, 1))
    with pytest.raises(ScheduleError, match="before its input.s receive is posted"):
        validate(broken, 2, 1, 4)


def test_microbatch_counts():
    check_microbatches("interleaved", 4, 2, 8)
    check_microbatches("1f1b", 4, 1, 3)
    check_microbatches("interleaved", 4, 2, 6)
    with pytest.raises(ScheduleError, match="parallel.microbatches=0 must be a positive integer"):
        check_microbatches("interleaved", 4, 2, 0)
    with pytest.raises(ScheduleError, match="parallel.schedule=zb"):
        check_microbatches("zb", 4, 1, 8)


def test_partition():
    assert chunk_plan(3, 16, 4, 2).layers == [6, 7]
    plans = rank_chunk_plans(1, 16, 4, 2)
    assert [p.stage for p in plans] == [1, 5] and [p.layers for p in plans] == [[2, 3], [10, 11]]
    assert chunk_plan(0, 8, 4, 2).has_embedding and chunk_plan(7, 8, 4, 2).has_head
    with pytest.raises(ScheduleError, match="model.n_layers=6"):
        chunk_plan(0, 6, 4, 2)


# the runtime against one process ---------------------------------------------------------

TINY = dict(vocab_size=64, dim=32, n_layers=8, n_heads=4, max_seq_len=32)
CASES = {2: [("gpipe", 1, 4), ("1f1b", 1, 4), ("1f1b", 1, 8), ("interleaved", 2, 4), ("interleaved", 2, 8),
             ("interleaved", 2, 3), ("interleaved", 2, 5), ("gpipe", 2, 8), ("zbh1", 1, 4), ("zbh1", 1, 8),
             ("zbv", 2, 4), ("zbv", 2, 8), ("dualpipev", 2, 4),
             ("dualpipev", 2, 8)],
         4: [("gpipe", 1, 8), ("1f1b", 1, 4), ("1f1b", 1, 8), ("interleaved", 2, 4), ("interleaved", 2, 8),
             ("interleaved", 2, 6), ("interleaved", 2, 3),
             ("zbh1", 1, 4), ("zbh1", 1, 8), ("zbv", 2, 4), ("zbv", 2, 8), ("dualpipev", 2, 8)]}


class _Probe(torch.autograd.Function):
    """Identity whose autograd node holds a marker: the marker dies when the node does."""

    @staticmethod
    def forward(ctx, x, marker):
        ctx.marker = marker
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class LiveCounter:
    """Counts chunk forwards whose autograd graph is still alive (a forward hook on each chunk)."""

    def __init__(self):
        self.live = self.peak = 0

    def hook(self, module, args, output):
        if not torch.is_grad_enabled():
            return output
        marker = torch.empty(0)
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(marker, self._dead)
        return _Probe.apply(output, marker)

    def _dead(self):
        self.live -= 1


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def pipeline_worker(rank, world_size, cases, transport="auto"):
    from plait.parallel.grid import Grid
    from plait.parallel.pipeline.runtime import PipelineRuntime
    from plait.parallel.pipeline.schedule import placement
    from plait.train.build import build_chunks, hidden_shape, named_parameters_of
    from plait.train.config import ModelConfig
    from plait.train.build import build_model
    from plait.train.step import forward_backward

    cfg = ModelConfig(**TINY)
    grid = Grid.build(pp=world_size)
    reference, grads_of = {}, {}
    results = []
    for schedule, vpp, m in cases:
        generator = torch.Generator().manual_seed(m)
        batch = torch.randint(0, cfg.vocab_size, (m, 2, 17), generator=generator)
        if m not in reference:
            model = build_model(cfg, seed=7)
            loss = forward_backward(model, batch)
            reference[m] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters()})
        chunks = build_chunks(cfg, grid, vpp, seed=7, placement=placement(schedule))
        counter = LiveCounter()
        for chunk in chunks:
            chunk.register_forward_hook(counter.hook)
        runtime = PipelineRuntime(chunks, grid, schedule=schedule, vpp=vpp, microbatches=m,
                                  hidden_shape=hidden_shape(2, 16, cfg.dim, 1, False), transport=transport)
        calls = []
        loss = runtime.run(batch[:, :, :-1], batch[:, :, 1:], lambda out, tgt: chunks[-1].loss(out, tgt),
                           before_last_backward=calls.append)
        unfreed = runtime.peak_unfreed_outputs  # sent outputs whose data was still held, at most
        ref_loss, ref_grads = reference[m]
        grad_error = max(_relative(p.grad, ref_grads[n]) for n, p in named_parameters_of(chunks))
        grads_of[(schedule, vpp, m)] = {n: p.grad.clone() for n, p in named_parameters_of(chunks)}
        fused = grads_of.get(("1f1b", 1, m)) if schedule == "zbh1" else None  # same order of F and of B / I
        same_as_fused = None if fused is None else all(torch.equal(p.grad, fused[n]) for n, p in named_parameters_of(chunks))
        with torch.no_grad():
            eval_loss = runtime.run(batch[:, :, :-1], batch[:, :, 1:], lambda out, tgt: chunks[-1].loss(out, tgt),
                                    forward_only=True)
        for chunk in chunks:  # a second step: nothing of the first (a grad, a buffer, a message) may leak into it
            chunk.zero_grad(set_to_none=True)
        again = runtime.run(batch[:, :, :-1], batch[:, :, 1:], lambda out, tgt: chunks[-1].loss(out, tgt))
        again_error = max([abs(float(again) - ref_loss) / ref_loss]
                          + [_relative(p.grad, ref_grads[n]) for n, p in named_parameters_of(chunks)])
        results.append(dict(case=(schedule, vpp, m), loss_error=abs(float(loss) - ref_loss) / ref_loss,
                            again_error=again_error,
                            eval_error=abs(float(eval_loss) - ref_loss) / ref_loss, grad_error=grad_error,
                            n_params=sum(1 for _ in named_parameters_of(chunks)), n_reference=len(ref_grads),
                            calls=calls, same_as_fused=same_as_fused,
                            peak_live=counter.peak, live_after=counter.live,
                            unfreed=unfreed, transport=runtime.transport_name))
    return results


@pytest.mark.parametrize("pp,transport", [(2, "shm"), (2, "dist"), (4, "auto"), (4, "dist")])
def test_runtime_matches_one_process(pp, transport):
    results = run_ranks(pp, pipeline_worker, CASES[pp], transport)
    for index, (schedule, vpp, m) in enumerate(CASES[pp]):
        per_rank = [results[rank][index] for rank in range(pp)]
        for rank, result in enumerate(per_rank):
            assert result["transport"] == ("shm" if transport == "auto" else transport), result  # one host: shm
            assert result["loss_error"] < 1e-5, (result, rank)
            assert result["eval_error"] < 1e-5, (result, rank)
            assert result["grad_error"] < 1e-5, (result, rank)
            assert result["again_error"] < 1e-5, (result, rank)
            assert sorted(result["calls"]) == list(range(vpp)), result  # once per chunk
            assert result["live_after"] == 0, result  # nothing kept after the step
        assert sum(r["n_params"] for r in per_rank) == per_rank[0]["n_reference"]  # every weight once
        peaks = [r["peak_live"] for r in per_rank]
        if schedule == "1f1b":
            assert max(peaks) <= pp and peaks[0] == min(pp, m), peaks
            # sent outputs' data is freed by their backward at the latest (gloo: once the schedule proves receipt)
            assert max(r["unfreed"] for r in per_rank) <= pp, per_rank
        if schedule == "gpipe":
            assert max(peaks) == m * vpp, peaks
        if schedule == "zbh1":  # graphs live until W: 1F1B's peak (p) on every rank; grads bitwise 1F1B's
            assert max(peaks) == min(pp, m), peaks
            assert all(r["same_as_fused"] for r in per_rank), per_rank
        if schedule == "zbv":  # two half chunks per micro-batch: 1F1B's activations
            assert max(peaks) <= 2 * pp, peaks


def test_config_rejects_pipelines_that_cannot_run():
    from plait.train.config import ConfigError, load_config, validate

    validate(load_config(["parallel.pp=2", "parallel.vpp=2", "parallel.microbatches=8"]), 2)
    validate(load_config(["parallel.pp=2", "parallel.vpp=2", "parallel.microbatches=3", "train.batch_size=12"]), 2)
    bad = {("parallel.pp=2", "parallel.vpp=2", "parallel.microbatches=0"): "parallel.microbatches=0",
           ("parallel.pp=2", "parallel.vpp=4", "parallel.microbatches=8"): "model.n_layers=4 is not divisible",
           ("parallel.vpp=2",): "parallel.vpp=2 needs parallel.pp > 1",
           ("parallel.pp=2", "parallel.schedule=zb"): "parallel.schedule=zb",
           ("parallel.pp=2", "parallel.pp_transport=tcp"): "parallel.pp_transport=tcp is not one of auto, shm, dist"}
    for overrides, message in bad.items():
        cfg = load_config(list(overrides))
        with pytest.raises(ConfigError, match=message):
            validate(cfg, 2 if "parallel.pp=2" in overrides else 1)


def test_schedule_tool_draws_text_and_png(tmp_path, capsys):
    from plait.parallel.pipeline.cli import main

    out = tmp_path / "interleaved.png"
    assert main(["--pp", "4", "--vpp", "2", "--microbatches", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bubble 0.1875 (theory 0.1875)" in printed and printed.count("rank ") == 4 + 1  # 4 rows + the summary
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--pp", "4", "--vpp", "2", "--microbatches", "6", "--no-png"]) == 0  # groups of 6: not a multiple of p
    assert "bubble 0.2500 (theory 0.2500)" in capsys.readouterr().out
    assert main(["--pp", "4", "--vpp", "2", "--microbatches", "0", "--no-png"]) == 2
    assert "parallel.microbatches=0" in capsys.readouterr().err


def transport_worker(rank, world_size):
    """Ranks 1 and 2 form a group (group ranks 0 and 1): each transport moves a tensor both ways."""
    import torch.distributed as dist

    from plait.parallel.pipeline.transport import SharedMemoryTransport, batched_transport, direct_transport

    group = dist.new_group([1, 2])
    received = {}
    if rank == 0:
        return received
    peer = 3 - rank  # global ranks
    shm = SharedMemoryTransport(group, rank, [peer], slot_bytes=16, microbatches=2, pp=2, vpp=1)
    received["files_left"] = [path for path in shm.paths if os.path.exists(path)]
    received["files_made"] = len(shm.paths)
    for name, post in (("batched", batched_transport(group, (peer,))), ("direct", direct_transport(group, (peer,))),
                       ("shm", shm.post)):
        for tag in (1, 6):  # two messages each way, waited on in send order (shm: two different slots)
            buffer = torch.empty(4)
            outgoing = torch.arange(4.0) + 10 * rank + tag
            works = post([(buffer, peer, tag)], [(outgoing, peer, tag)])
            for work in works:
                work.wait()
            received.setdefault(name, []).append(buffer.tolist())
    return received


def test_transports_move_tensors_within_a_subgroup():
    results = run_ranks(3, transport_worker)
    for rank in (1, 2):
        expected = [(torch.arange(4.0) + 10 * (3 - rank) + tag).tolist() for tag in (1, 6)]
        assert results[rank]["files_made"] == 2  # its inbox's slots and FIFO
        assert results[rank]["files_left"] == []  # unlinked once both ends had them open
        assert {name: results[rank][name] for name in ("batched", "direct", "shm")} == {
            "batched": expected, "direct": expected, "shm": expected}


def shm_misuse_worker(rank, world_size):
    """A message of the wrong size, a receive whose sender never sends, and ranks with separate /dev/shm."""
    import torch.distributed as dist

    from plait.parallel.pipeline import transport
    from plait.parallel.pipeline.transport import PeerTimeout, SharedMemoryTransport, TransportError, choose_transport

    group, peer, errors = dist.group.WORLD, 1 - rank, {}
    shm = SharedMemoryTransport(group, rank, [peer], slot_bytes=16, microbatches=1, pp=2, vpp=1, timeout_s=0.3)
    try:
        shm.post([], [(torch.zeros(5), peer, 0)])
    except TransportError as error:
        errors["size"] = str(error)
    (work,) = shm.post([(torch.empty(4), peer, 1)], [])
    try:
        work.wait()  # nobody sends tag 1
    except PeerTimeout as error:
        errors["timeout"] = str(error)
    dist.barrier()
    transport.AUTO_ROOM = 1e-12  # no room: auto takes the process group, on every rank alike
    _, errors["no_room"] = choose_transport("auto", group, "gloo", rank, [rank, peer], slot_bytes=16, microbatches=1,
                                            pp=2, vpp=1)
    transport.AUTO_ROOM = 0.25
    with tempfile.TemporaryDirectory(prefix="plait-test-shm-") as private:  # a /dev/shm of its own
        transport.SHM_DIR = private
        peers = [rank, peer]
        _, chosen = choose_transport("auto", group, "gloo", rank, peers, slot_bytes=16, microbatches=1, pp=2, vpp=1)
        try:
            choose_transport("shm", group, "gloo", rank, peers, slot_bytes=16, microbatches=1, pp=2, vpp=1)
        except TransportError as error:
            errors["separate"] = str(error)
        errors["left_in_private"] = os.listdir(private)
    return chosen, errors


def shm_peer_lost_worker(rank, world_size):
    """Rank 1 closes its channels (what the kernel does when a process dies); rank 0 then waits on a receive from it
    and sends to it. Each raises PeerLost at once, not the 20 s timeout's PeerTimeout."""
    import torch.distributed as dist

    from plait.parallel.pipeline.transport import PeerLost, SharedMemoryTransport

    shm = SharedMemoryTransport(dist.group.WORLD, rank, [1 - rank], slot_bytes=16, microbatches=1, pp=2, vpp=1,
                                timeout_s=20.0)
    if rank == 1:
        shm.close()
    dist.barrier()
    errors = {}
    if rank == 0:
        (work,) = shm.post([(torch.empty(4), 1, 1)], [])
        for name, act in (("receive", work.wait), ("send", lambda: shm.post([], [(torch.zeros(4), 1, 0)]))):
            try:
                act()
            except PeerLost as error:
                errors[name] = str(error)
    dist.barrier()
    return errors


def test_shared_memory_transport_notices_a_peer_that_is_gone():
    errors = run_ranks(2, shm_peer_lost_worker)[0]
    assert errors["receive"].startswith("pipeline rank 1 closed its end of the shared-memory channel while this "
                                        "rank waited")
    assert errors["send"].startswith("pipeline rank 1 closed its end of the shared-memory channel before this "
                                     "rank's message")


def test_shared_memory_transport_refuses_what_it_cannot_carry():
    for rank, (chosen, errors) in enumerate(run_ranks(2, shm_misuse_worker)):
        assert chosen == "dist"  # auto: the peers cannot see each other's inboxes, so the process group
        assert errors["no_room"] == "dist"
        assert "does not fill the 16-byte slot" in errors["size"]
        assert f"no pipeline message from rank {1 - rank} in 0 s" in errors["timeout"]
        assert errors["separate"].startswith("parallel.pp_transport=shm cannot run here: rank ")
        assert "cannot open rank" in errors["separate"]
        assert errors["separate"].endswith("use parallel.pp_transport=auto.")
        assert errors["left_in_private"] == []


def test_shm_is_refused_for_device_tensors():
    from plait.parallel.pipeline.transport import TransportError, choose_transport

    for backend in ("nccl", "gloo"):  # gloo can carry CUDA tensors too; shared memory cannot
        with pytest.raises(TransportError, match=f"parallel.pp_transport=shm cannot run here: shared memory "
                                                 f"carries host tensors over gloo, not cuda tensors over {backend}"):
            choose_transport("shm", None, backend, 0, [0, 1], slot_bytes=16, microbatches=1, pp=2, vpp=1,
                             device=torch.device("cuda", 0))
    with pytest.raises(TransportError, match="parallel.pp_transport=tcp is not one of auto, shm, dist"):
        choose_transport("tcp", None, "gloo", 0, [0, 1], slot_bytes=16, microbatches=1, pp=2, vpp=1)
