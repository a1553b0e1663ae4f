"""Checkpoints written in the background: the snapshot, the overlap, byte-identical files, failures, kill -9.

In-process tests hold the writer at a gate to see what happens while a write is in flight;
the kill -9 matrix runs plait-train (1 rank, and 4 ranks under torchrun: pp 2 x dp 2 with
ZeRO-1, so every rank writes files of its own) with `PLAIT_FAULT_CHECKPOINT=<phase>@4`: the
process kills itself at that phase of the step-4 save, the previous checkpoint must still be
`latest` (or step 4's, once published), the other ranks must leave on their own with the
lost-peer line, and `train.resume=auto` must give every later step the uninterrupted run's
loss, bit for bit.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from plait.train.checkpoint import latest_checkpoint
from plait.train.checkpointer import FAULT_PHASES
from plait.train.config import load_config
from plait.train.reshard import ShardReader

SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "train.seq_len=16",
         "train.batch_size=4", "train.eval_every=0", "train.log_every=1", "train.progress=false",
         "train.peak_flops=1e10", "train.threads=1", "optim.warmup_steps=1"]


def trainer(tmp_path, cache, *extra):
    from plait.train.trainer import Trainer

    return Trainer(load_config(SMALL + ["train.steps=8", f"train.run_dir={tmp_path}", f"data.cache_dir={cache}",
                                        *extra]))


class Gate:
    """Holds the background writer before it writes a file, until opened."""

    def __init__(self, monkeypatch):
        from plait.train import checkpoint as checkpoint_lib

        self.open, self.reached = threading.Event(), threading.Event()
        original = checkpoint_lib._write_part

        def held(*args, **kwargs):
            self.reached.set()
            assert self.open.wait(timeout=60)
            return original(*args, **kwargs)

        monkeypatch.setattr(checkpoint_lib, "_write_part", held)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # CUDA: pinned buffers, side-stream copies


@pytest.mark.parametrize("device", DEVICES)
def test_training_goes_on_while_the_write_runs_and_the_checkpoint_holds_the_saved_step(tmp_path, stdlib_tokens,
                                                                                       monkeypatch, device):
    cache = stdlib_tokens[0].parent.parent
    run = trainer(tmp_path, cache, f"train.device={device}")
    run.step()
    saved = {name: p.detach().clone() for name, p in run.named_params.items()}
    gate = Gate(monkeypatch)
    path = run.save_checkpoint()
    assert gate.reached.wait(timeout=60) and not path.exists()  # the write is held, the trainer is free
    for _ in range(2):
        run.step()  # the weights change after the snapshot
    assert any(not torch.equal(p, saved[n]) for n, p in run.named_params.items())
    gate.open.set()
    run.checkpointer.wait()
    reader = ShardReader(path)
    for name, value in saved.items():
        assert torch.equal(reader.full_param(name)[:value.shape[0]], value.cpu()), name
    assert reader.rank_state(0)["step"] == 1 and latest_checkpoint(tmp_path / "checkpoints") == path
    run.close()


def test_a_second_save_waits_for_the_first_and_says_so(tmp_path, stdlib_tokens, monkeypatch, caplog):
    cache = stdlib_tokens[0].parent.parent
    run = trainer(tmp_path, cache)
    run.step()
    gate = Gate(monkeypatch)
    run.save_checkpoint()
    gate.reached.wait(timeout=60)
    run.step()
    threading.Timer(0.3, gate.open.set).start()
    with caplog.at_level(logging.INFO, logger="plait"):
        second = run.save_checkpoint()
    run.checkpointer.wait()
    assert "waited" in caplog.text and "for step 1's write to finish before saving step 2" in caplog.text
    assert latest_checkpoint(tmp_path / "checkpoints") == second
    run.close()


@pytest.mark.parametrize("device", DEVICES)
def test_background_and_foreground_saves_write_the_same_bytes(tmp_path, stdlib_tokens, device):
    cache = stdlib_tokens[0].parent.parent
    paths = {}
    for mode in ("true", "false"):
        run = trainer(tmp_path / mode, cache, f"checkpoint.async_save={mode}", f"train.device={device}")
        run.step()
        run.step()
        paths[mode] = run.save_checkpoint()
        run.close()
    names = sorted(p.name for p in paths["true"].iterdir())
    assert names == sorted(p.name for p in paths["false"].iterdir()) and "index.json" in names
    for name in names:
        a, b = (paths["true"] / name).read_bytes(), (paths["false"] / name).read_bytes()
        if name.endswith(".json"):  # the index's creation time and the rank files' config (run_dir) differ
            a, b = json.loads(a), json.loads(b)
            for record in (a, b):
                record.pop("created", None), record.pop("config", None)
                for file in [f for f in record.get("files", {}) if f.startswith("rank-")]:
                    record["files"].pop(file)
            assert a == b, name
        else:
            assert a == b, name  # the safetensors files, byte for byte


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_full_disk_in_the_background_keeps_the_previous_checkpoint(tmp_path, stdlib_tokens, monkeypatch, caplog,
                                                                     on_error):
    import errno

    from plait.train import checkpoint as checkpoint_lib
    from plait.train.checkpoint import CheckpointError

    cache = stdlib_tokens[0].parent.parent
    run = trainer(tmp_path, cache, f"checkpoint.on_error={on_error}")
    run.step()
    first = run.save_checkpoint()
    run.checkpointer.wait()
    run.step()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for writer in ("write_safetensors", "write_arena"):  # streamed or from the host buffers: the disk is full
        monkeypatch.setattr(checkpoint_lib, writer, full)
    run.save_checkpoint()
    run.step()  # training goes on while the write fails in the background
    with caplog.at_level(logging.WARNING, logger="plait"):
        if on_error == "stop":
            with pytest.raises(CheckpointError, match=r"checkpoint.dir=.*: saving step 2 failed \(No space left"):
                run.checkpointer.wait()
        else:
            run.checkpointer.wait()
            assert "saving step 2 failed" in caplog.text and "Training goes on" in caplog.text
    assert latest_checkpoint(tmp_path / "checkpoints") == first
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    run.close()


def test_preemption_during_a_background_write_finishes_it_before_requeue(tmp_path, stdlib_tokens, monkeypatch):
    from plait.launch.signals import Preempted

    cache = stdlib_tokens[0].parent.parent
    run = trainer(tmp_path, cache, "checkpoint.every=2", "train.steps=50")
    gate = Gate(monkeypatch)
    threading.Thread(target=lambda: (gate.reached.wait(60), os.kill(os.getpid(), signal.SIGTERM),
                                     threading.Timer(0.5, gate.open.set).start()), daemon=True).start()
    with pytest.raises(Preempted) as stopped:
        run.fit()
    root = tmp_path / "checkpoints"
    assert stopped.value.step >= 2 and latest_checkpoint(root) == stopped.value.path
    assert (root / "step-00000002" / "index.json").is_file()  # the held write was finished, not dropped
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


# kill -9 at every phase of a save ----------------------------------------------------------------------
def plait_train(run_dir, cache, ranks, steps, *extra, env=None):
    command = [sys.executable, "-m", "plait.train"]
    layout = []
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "plait.train"]
        layout = ["parallel.pp=2", "parallel.zero=1", "parallel.microbatches=2"]
    overrides = [*SMALL, *layout, f"train.steps={steps}", "checkpoint.every=2", "checkpoint.keep=3",
                 f"train.run_dir={run_dir}", f"data.cache_dir={cache}", *extra]
    return subprocess.run(command + overrides, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def exit_codes(torchrun_stderr: str) -> dict:
    """{rank: exit code} from torchrun's failure summary."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", torchrun_stderr)
    return {int(rank): int(code) for rank, code in found}


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


# 1 rank: every phase. 4 ranks (about 15 s a launch on 2 cores): the phases where the ranks' writers must
# agree: rank 0 killed inside a file, the last rank killed after its own files (the others have theirs
# on disk and wait), and rank 0 killed between the rename and `latest`.
KILLS = {1: [(phase, 0) for phase in FAULT_PHASES], 4: [("tensor", 0), ("rank-files", 3), ("renamed", 0)]}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", sorted(KILLS))
def test_kill_at_every_phase_of_a_background_save_then_resume_exactly(tmp_path, stdlib_tokens, ranks):
    """One run killed with -9 at each phase in turn: killed while saving step 4, resumed and killed while saving
    step 6, and so on, then resumed to the end. Each kill leaves the previous complete checkpoint as `latest`
    (the step just saved when killed after publishing it), whole and verified; each next run resumes from it;
    and every step's loss, the re-run ones too, equals an unkilled run's bit for bit."""
    cache = stdlib_tokens[0].parent.parent
    kills = KILLS[ranks]
    steps = 4 + 2 * len(kills)  # a save to kill per phase, then one more to finish on
    reference = plait_train(tmp_path / "reference", cache, ranks, steps)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = losses(tmp_path / "reference")
    assert sorted(expected) == list(range(1, steps + 1))
    run_dir, previous = tmp_path / "killed", None
    for index, (phase, rank) in enumerate(kills):
        step = 4 + 2 * index
        resume = ["train.resume=auto"] if previous is not None else []
        killed = plait_train(run_dir, cache, ranks, steps, *resume, env={"PLAIT_FAULT_CHECKPOINT": f"{phase}@{step}",
                                                                         "PLAIT_FAULT_RANK": str(rank)})
        assert killed.returncode != 0, (phase, killed.stderr[-2000:])
        assert f"PLAIT_FAULT_CHECKPOINT={phase}" in killed.stdout + killed.stderr, phase
        if ranks > 1:  # the others noticed, said so and left on their own (torchrun SIGKILLed none of them)
            assert exit_codes(killed.stderr) == {r: -9 if r == rank else 2 for r in range(ranks)}, killed.stderr
        assert previous is None or f"resumed from {previous}" in killed.stdout, phase
        latest = latest_checkpoint(run_dir / "checkpoints")
        assert latest.name == f"step-{step if phase == 'published' else step - 2:08d}", phase
        assert ShardReader(latest).index["step"] == int(latest.name[5:])  # whole, verified files
        previous = latest
    resumed = plait_train(run_dir, cache, ranks, steps, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {previous}" in resumed.stdout
    assert losses(run_dir) == expected  # every step, the re-run ones too, bit for bit
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("where", ["disk", "shm"])
def test_a_file_arena_writes_the_bytes_the_streaming_writer_writes(tmp_path, where):
    """O_DIRECT from the laid-out buffer (padded to a page, truncated back), or plain writes where the
    filesystem refuses O_DIRECT (tmpfs): the same file, byte for byte, with the same size and CRC-32."""
    import tempfile

    import crc32c

    from plait.train.filearena import FileArena, items_of, write_arena
    from plait.train.tensorfile import write_safetensors

    if where == "shm" and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    directory = Path(tempfile.mkdtemp(dir="/dev/shm")) if where == "shm" else tmp_path
    torch.manual_seed(0)
    tensors = {"a": torch.randn(1000, 37), "b/exp_avg": torch.randn(5), "c": torch.arange(7, dtype=torch.int64),
               "d": torch.randn(3, 3).bfloat16(), "e": torch.randn(40000)}
    arena = FileArena(items_of(tensors))
    for name, tensor in tensors.items():
        arena.views[name].copy_(tensor)
    record = write_arena(directory / "arena.safetensors", arena)
    reference = write_safetensors(directory / "stream.safetensors", tensors)
    data = (directory / "arena.safetensors").read_bytes()
    assert data == (directory / "stream.safetensors").read_bytes()
    assert record == reference == {"bytes": len(data), "crc32c": crc32c.crc32c(data)} and len(data) % 4096
    arena.close()
