"""Activation offload: bitwise-equal gradients, dedupe, liveness, stress, cleanup, errors."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from plait.offload import ActivationOffload, OffloadConfig, OffloadError, OffloadIOError, layer_modes
from plait.offload.config import validate_offload
from plait.train.build import build_model, init_parameters
from plait.train.model import Transformer
from tests.offload_utils import TINY, attach, batch, forward_backward, grads, offload_config, scratch_files

POLICIES = ["offload", "recompute", "recompute,offload,offload,keep"]


@pytest.fixture(scope="module")
def reference():
    """Gradients of the tiny decoder without offload, per precision."""
    tokens = batch()
    result = {}
    for precision in ("fp32", "bf16"):
        model = build_model(TINY, seed=3)
        forward_backward(model, tokens, precision)
        result[precision] = grads(model)
    return tokens, result


def assert_bitwise(actual, expected):
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"gradients differ bitwise: {different}"


@pytest.mark.parametrize("backend", ["host", "file"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", POLICIES)
def test_gradients_bitwise_equal(tmp_path, reference, backend, precision, policy):
    tokens, expected = reference
    model = build_model(TINY, seed=3)
    offload = attach(model, offload_config(backend, str(tmp_path), policy=policy))
    metrics = forward_backward(model, tokens, precision, offload)
    assert_bitwise(grads(model), expected[precision])
    if "offload" in policy:
        assert metrics["offload_written_bytes"] > 0 and metrics["offload_read_bytes"] > 0
        assert metrics["offload_read_bytes"] + metrics["offload_from_memory_bytes"] >= metrics[
            "offload_written_bytes"]
    else:
        assert metrics["offload_offloaded_bytes"] == 0
    assert scratch_files(str(tmp_path)) == []
    offload.close()
    assert os.listdir(tmp_path) == []


def test_aio_backend_bitwise(tmp_path, reference):
    """DeepSpeed's libaio op (built once, a few minutes; CI installs libaio-dev)."""
    from plait.offload.aio import load_aio_op

    try:
        load_aio_op()
    except OffloadError as error:
        pytest.skip(f"DeepSpeed async_io op cannot be built here: {error}")
    tokens, expected = reference
    for precision in ("fp32", "bf16"):
        model = build_model(TINY, seed=3)
        offload = attach(model, offload_config("aio", str(tmp_path), threads=2))
        metrics = forward_backward(model, tokens, precision, offload)
        assert_bitwise(grads(model), expected[precision])
        assert metrics["offload_written_bytes"] > 0 and metrics["offload_read_bytes"] > 0
        assert scratch_files(str(tmp_path)) == []
        offload.close()


class ViewBlock(nn.Module):
    """h = lin(x); sin saves the first half of h, cos the second: two views of one storage."""

    def __init__(self, keep_alive: bool = False):
        super().__init__()
        self.lin = nn.Linear(16, 128)
        self.keep_alive, self.held = keep_alive, None

    def forward(self, x):
        h = self.lin(x)
        if self.keep_alive:
            self.held = h  # still alive when backward asks for it
        first, second = h.chunk(2, dim=-1)
        return first.sin() + second.cos()


class ViewChunk(nn.Module):
    def __init__(self, keep_alive: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({"0": ViewBlock(keep_alive)})

    def forward(self, x):
        return self.layers["0"](x)


def run_view_chunk(tmp_path, keep_alive=False, wait_writes=False, busy_disk=False):
    chunk = ViewChunk(keep_alive)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))  # 16 KB: under min_bytes
    expected_chunk = ViewChunk(keep_alive)
    expected_chunk(x).sum().backward()
    offload = attach(chunk, offload_config("file", str(tmp_path), keep_last=0, min_bytes=32 * 1024, threads=1))
    if busy_disk:  # the only I/O worker is busy: the write stays queued
        offload.store.pool.submit(time.sleep, 0.5)
    with offload.step():
        out = chunk(x)
        if wait_writes:
            offload.cache.wait_writes()
        out.sum().backward()
    for name, param in chunk.named_parameters():
        assert torch.equal(param.grad, dict(expected_chunk.named_parameters())[name].grad)
    assert scratch_files(str(tmp_path)) == []
    offload.close()
    return offload.last_metrics


def test_views_of_one_storage_written_once(tmp_path):
    metrics = run_view_chunk(tmp_path, wait_writes=True)
    storage, view = 256 * 128 * 4, 256 * 64 * 4
    assert metrics["offload_offloaded_bytes"] == 2 * view
    assert metrics["offload_written_bytes"] == storage
    assert metrics["offload_deduplicated_bytes"] == view
    assert metrics["offload_read_bytes"] == storage
    assert metrics["offload_from_memory_bytes"] == 0


def test_alive_tensor_served_from_memory(tmp_path):
    storage = 256 * 128 * 4
    written = run_view_chunk(tmp_path, keep_alive=True, wait_writes=True)
    assert (written["offload_written_bytes"], written["offload_read_bytes"],
            written["offload_from_memory_bytes"]) == (storage, 0, storage)
    # a busy disk: the write is still queued when backward asks, so it is cancelled
    pending = run_view_chunk(tmp_path, keep_alive=True, busy_disk=True)
    assert (pending["offload_written_bytes"], pending["offload_read_bytes"],
            pending["offload_from_memory_bytes"]) == (0, 0, storage)


@pytest.mark.parametrize("backend", ["file", "host"])
def test_stress_random_io_delays_many_steps(tmp_path, backend):
    """Random delays in the I/O workers, 8 optimizer steps: parameters stay bitwise equal."""
    runs = {}
    for offloaded in (False, True):
        model = build_model(TINY, seed=5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        offload = None
        if offloaded:
            offload = attach(model, offload_config(backend, str(tmp_path), threads=2, prefetch=1))
            rng = random.Random(0)
            offload.store.jitter = lambda: time.sleep(rng.uniform(0.0, 0.004))
        for step in range(8):
            forward_backward(model, batch(seed=step), "fp32", offload)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert scratch_files(str(tmp_path)) == []
        runs[offloaded] = {name: param.detach().clone() for name, param in model.named_parameters()}
        if offload is not None:
            offload.close()
    assert_bitwise(runs[True], runs[False])


def chunks_of_two_ranks(seed: int):
    """The tiny decoder cut in 4 virtual stages: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3."""
    stages = [Transformer(TINY, layers=[index], has_embedding=index == 0, has_head=index == 3)
              for index in range(4)]
    for stage in stages:
        init_parameters(stage, seed)
    return stages


ORDER = ([("F", s, m) for m in (0, 1) for s in range(4)]
         + [("F", 0, 2), ("B", 3, 0), ("F", 1, 2), ("B", 2, 0), ("F", 2, 2), ("B", 1, 0), ("F", 3, 2),
            ("F", 0, 3), ("B", 0, 0), ("F", 1, 3), ("B", 3, 1), ("B", 3, 2), ("F", 2, 3), ("B", 2, 2),
            ("B", 2, 1), ("F", 3, 3), ("B", 1, 1), ("B", 1, 2), ("B", 3, 3), ("B", 0, 1), ("B", 2, 3),
            ("B", 0, 2), ("B", 1, 3), ("B", 0, 3)])


def run_pipeline_by_hand(tokens, offloads=None):
    """Walk ORDER over the 4 stages (boundaries detached, as a pipeline runtime does)."""
    stages = chunks_of_two_ranks(seed=3)
    for index, stage in enumerate(stages):
        if offloads:
            offloads[index % 2].attach(stage)
    for offload in offloads or []:
        offload.begin_step()
    inputs, outputs = {}, {}
    for kind, stage, micro in ORDER:
        if kind == "F":
            x = tokens[micro, :, :-1] if stage == 0 else outputs[stage - 1, micro].detach().requires_grad_()
            inputs[stage, micro] = x
            outputs[stage, micro] = stages[stage](x)
        elif stage == 3:
            (stages[3].loss(outputs.pop((3, micro)), tokens[micro, :, 1:]) / tokens.shape[0]).backward()
        else:
            outputs.pop((stage, micro)).backward(inputs[stage + 1, micro].grad)
    metrics = [offload.end_step() for offload in offloads or []]
    return {name: param.grad for stage in stages for name, param in stage.named_parameters()}, metrics


def test_interleaved_pipeline_by_hand(tmp_path):
    """pp=2, vpp=2 by hand in one process: many micro-batches in flight per chunk, out of order."""
    tokens = batch(micro=4, seed=9)
    expected, _ = run_pipeline_by_hand(tokens)
    offloads = [ActivationOffload(offload_config("file", str(tmp_path / f"rank{rank}"), keep_last=0), None)
                for rank in range(2)]
    actual, metrics = run_pipeline_by_hand(tokens, offloads)
    assert_bitwise(actual, expected)
    assert all(m["offload_written_bytes"] > 0 and m["offload_read_bytes"] > 0 for m in metrics)
    assert scratch_files(str(tmp_path)) == []


def test_no_file_left_after_exception_in_backward(tmp_path, monkeypatch):
    from plait.offload.files import FileStore

    model = build_model(TINY, seed=3)
    offload = attach(model, offload_config("file", str(tmp_path)))

    def broken_read(self, name, offset, out):
        raise OSError(errno.EIO, "injected read failure")

    monkeypatch.setattr(FileStore, "read_bytes", broken_read)
    with pytest.raises(OffloadIOError, match=f"offload.path={tmp_path}"):
        forward_backward(model, batch(), "fp32", offload)
    assert scratch_files(str(tmp_path)) == []
    monkeypatch.undo()
    forward_backward(model, batch(), "fp32", offload)  # the next step works
    assert scratch_files(str(tmp_path)) == []
    offload.close()
    assert os.listdir(tmp_path) == []


def test_full_disk_mid_run_is_clear_and_harmless(tmp_path, monkeypatch):
    """ENOSPC from the 5th write: a clear error; model, optimizer and checkpoint untouched."""
    import plait.offload.files as files

    model = build_model(TINY, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward_backward(model, batch(seed=1))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    checkpoint = tmp_path / "step1.safetensors"
    checkpoint.write_bytes(b"last checkpoint" * 100)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    state_before = {key: value.clone() for key, value in optimizer.state[next(model.parameters())].items()}

    offload = attach(model, offload_config("file", str(tmp_path)))
    real_pwrite, calls = os.pwrite, [0]

    def filling_pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] >= 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(files.os, "pwrite", filling_pwrite)
    with pytest.raises(OffloadIOError, match=r"offload.path=.* is full"):
        forward_backward(model, batch(seed=2), "fp32", offload)
        optimizer.step()  # never reached
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
    for key, value in optimizer.state[next(model.parameters())].items():
        assert torch.equal(value, state_before[key])
    assert checkpoint.read_bytes() == b"last checkpoint" * 100
    assert scratch_files(str(tmp_path)) == [str(checkpoint)]
    offload.close()


def test_unwritable_path_fails_at_start_up(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OffloadError, match=r"offload.path=.*a-file/offload is not a writable directory"):
        ActivationOffload(OffloadConfig(backend="file", path=str(blocker / "offload")))
    with pytest.raises(OffloadError, match="set offload.path"):
        validate_offload(OffloadConfig(backend="aio"))


CTRL_C_SCRIPT = """
import faulthandler, signal, sys, torch
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test dumps every thread's stack if it hangs
# a shell gives a program Ctrl-C as KeyboardInterrupt; but a pytest started in the background of a
# non-interactive shell (`pytest &`, as a harness may) has SIGINT ignored, as POSIX shells do to `&` jobs,
# and the child inherits that across exec (it then trains on through the SIGINT); so say what was
# inherited and start from what a terminal gives
print("inherited SIGINT handler", signal.getsignal(signal.SIGINT), "blocked", signal.pthread_sigmask(signal.SIG_BLOCK, []),
      file=sys.stderr, flush=True)
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
sys.path.insert(0, {root!r})
from plait.train.build import build_model
from tests.offload_utils import TINY, attach, batch, forward_backward, offload_config
model = build_model(TINY, seed=3)
offload = attach(model, offload_config("file", {path!r}))
offload.store.jitter = lambda: __import__("time").sleep(0.01)
step = 0
while True:
    forward_backward(model, batch(seed=step), "fp32", offload)
    if step == 0:
        print("ready", flush=True)
    step += 1
"""


def test_ctrl_c_leaves_no_file(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = CTRL_C_SCRIPT.format(root=root, path=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # in the middle of a later step
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        if process.poll() is None:
            process.send_signal(signal.SIGUSR1)  # every thread's stack into stderr
            time.sleep(2)
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"still running 60 s after Ctrl-C (exit status {process.returncode}); its stderr:\n{err[-8000:]}")
    assert "KeyboardInterrupt" in err
    assert os.listdir(tmp_path) == []


def test_ctrl_c_inside_drain_frees_the_workers():
    """A Ctrl-C that lands while `drain` waits for the workers must let them go: a worker left waiting on the
    barrier would make the interpreter's exit (which joins the pool) hang forever."""
    from plait.offload.store import Store

    store = Store(threads=1)
    store.submit(time.sleep, 0.3)  # the worker is busy when the drain's barrier task is queued behind it

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            store.drain()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert store.submit(lambda: 42).result(timeout=5) == 42  # the worker is free again
    store.close()


def test_layer_modes_and_config_errors():
    cfg = OffloadConfig(backend="host", policy="offload", keep_last=2)
    assert layer_modes(cfg, 4) == ["offload", "offload", "keep", "keep"]
    assert layer_modes(OffloadConfig(policy="recompute", keep_last=0), 3) == ["recompute"] * 3
    assert layer_modes(OffloadConfig(policy="keep,recompute"), 2) == ["keep", "recompute"]
    with pytest.raises(OffloadError, match="lists 2 modes but the chunk has 3"):
        layer_modes(OffloadConfig(policy="keep,recompute"), 3)
    with pytest.raises(OffloadError, match="offload.policy=swap"):
        validate_offload(OffloadConfig(backend="host", policy="swap"))
    with pytest.raises(OffloadError, match="offload.backend=ssd is unknown"):
        validate_offload(OffloadConfig(backend="ssd"))


def test_hydra_offload_group(tmp_path):
    from plait.train.config import load_config

    cfg = load_config(["offload=file", f"offload.path={tmp_path}"])
    assert (cfg.offload.backend, cfg.offload.path) == ("file", str(tmp_path))
    assert load_config(["offload=host"]).offload.backend == "host"
    assert load_config(["offload=aio", f"offload.path={tmp_path}"]).offload.backend == "aio"


def test_trainer_with_offload_matches_without(tmp_path, stdlib_tokens):
    """plait's Trainer with offload=file: same losses and grad norms, bitwise; counters in the metrics."""
    from plait.train import Trainer, load_config

    cache = stdlib_tokens[0].parent.parent
    base = ["model.dim=64", "model.n_layers=3", "model.n_heads=4", "train.seq_len=64", "train.batch_size=4",
            "parallel.microbatches=2", "train.progress=false", "train.threads=1", "train.peak_flops=1e10",
            f"data.cache_dir={cache}"]
    records = {}
    for name, extra in (("plain", []), ("offload", ["offload=file", f"offload.path={tmp_path / 'ssd'}",
                                                    "offload.device_filter=all", "offload.min_bytes=4096"])):
        trainer = Trainer(load_config(base + [f"train.run_dir={tmp_path / name}"] + extra))
        records[name] = [trainer.step() for _ in range(2)]
        trainer.close()
    for plain, offloaded in zip(records["plain"], records["offload"]):
        assert (plain["loss"], plain["grad_norm"]) == (offloaded["loss"], offloaded["grad_norm"])
        assert offloaded["offload_written_bytes"] > 0 and offloaded["offload_resident_peak_bytes"] > 0
        assert "offload_written_bytes" not in plain
    assert scratch_files(str(tmp_path / "ssd")) == []


def test_trainer_rejects_unwritable_offload_path(tmp_path):
    from plait.train.config import load_config, validate

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OffloadError, match="is not a writable directory"):
        validate(load_config(["offload=file", f"offload.path={blocker}/sub"]))


def test_offload_lowers_peak_resident_activation_bytes(tmp_path):
    """8 blocks, keep_last=1, prefetch=1, write window 1: well under the keep policy's peak."""
    from plait.train.config import ModelConfig

    cfg = ModelConfig(name="offload-deep", vocab_size=256, dim=64, n_layers=8, n_heads=4, max_seq_len=64)
    tokens = batch(micro=1, rows=4, seq=64)
    peaks = {}
    for policy in ("keep", "offload", "recompute"):
        model = build_model(cfg, seed=3)
        offload = attach(model, offload_config("file", str(tmp_path), policy=policy, write_window=1,
                                               keep_last=0 if policy == "recompute" else 1))
        per_step = [forward_backward(model, tokens, "fp32", offload)["offload_resident_peak_bytes"]
                    for _ in range(3)]
        assert offload.cache.tracker.sample() == 0  # nothing saved outlives its step
        assert max(per_step) <= 1.05 * min(per_step), per_step  # no growth over steps
        peaks[policy] = per_step[-1]
        offload.close()
    assert peaks["offload"] < 0.6 * peaks["keep"], peaks
    assert peaks["recompute"] < 0.2 * peaks["keep"], peaks


def test_device_filter_cuda_leaves_cpu_tensors_alone(tmp_path, reference):
    """The default filter moves only CUDA tensors: on CPU nothing is written, grads are unchanged."""
    tokens, expected = reference
    model = build_model(TINY, seed=3)
    offload = attach(model, offload_config("file", str(tmp_path), device_filter="cuda"))
    metrics = forward_backward(model, tokens, "fp32", offload)
    assert_bitwise(grads(model), expected["fp32"])
    assert metrics["offload_offloaded_bytes"] == metrics["offload_written_bytes"] == 0
    assert metrics["offload_resident_peak_bytes"] == 0
    offload.close()


def test_storages_share_segment_files_removed_once_empty(tmp_path, reference, monkeypatch):
    """Many storages go into few segment files (not one file each), each removed once, all by the step's end."""
    from plait.offload.files import FileStore

    created, removed = set(), []
    real_remove = FileStore._remove
    monkeypatch.setattr(FileStore, "_remove", staticmethod(lambda name: (removed.append(name), real_remove(name))))
    real_place = FileStore.place

    def counting_place(self, key, nbytes):
        name, offset = real_place(self, key, nbytes)
        created.add(name)
        return name, offset

    monkeypatch.setattr(FileStore, "place", counting_place)
    tokens, expected = reference
    model = build_model(TINY, seed=3)
    offload = attach(model, offload_config("file", str(tmp_path)))
    offload.store.segment_bytes = 1 << 20
    metrics = forward_backward(model, tokens, "fp32", offload)
    assert_bitwise(grads(model), expected["fp32"])
    entries = metrics["offload_written_bytes"] // 4096  # every saved storage here is at least 4 KiB
    segments = -(-metrics["offload_written_bytes"] // (1 << 20))
    assert 1 < len(created) <= segments + 2 < entries  # packed into segments, not one file per storage
    assert sorted(removed) == sorted(created)  # each segment removed exactly once
    assert scratch_files(str(tmp_path)) == []
    offload.close()
