"""Checkpoints: exact resume after kill -9 and after preemption, resharding across layouts,
damaged and foreign input.

The kill test runs `python -m plait.train` (1 rank) and `torchrun -m plait.train` at
tp2 x dp2 with ZeRO-1 (4 ranks; the async-save kill test runs pp2 x dp2) with a checkpoint
every 5 of 20 steps, kills every process with SIGKILL once step 11 is logged, plants the
temporary directory a kill during a save leaves behind, resumes with `train.resume=auto`,
sends SIGTERM to one rank after step 14 (all ranks finish the step, checkpoint and exit with
the requeue status), and resumes again: the losses of steps 11..20 equal, bit for bit, those of a run that never stopped
(fp32 on the CPU, one thread).

The reshard test trains 3 steps at tp2 x pp2 (vpp 2) x dp2 with ZeRO-1 on 8 ranks, saves,
and loads the checkpoint at tp4 x pp1 x dp2, tp1 x pp4 x dp2 and on one process (a
vocabulary of 300 is padded to 384 rows at tp=2, 320 at tp=1 and 512 at tp=4, so padding
rows are cut and added): the loss on a fixed batch matches to 1e-6 and the next 10 steps
match the original layout's (relative 1e-5).
"""


import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from plait.launch.signals import REQUEUE_EXIT_CODE
from plait.train.checkpoint import CheckpointError, latest_checkpoint
from plait.train.reshard import ShardReader
from tests.dist_utils import run_ranks

VOCAB = 300
MORE_STEPS = 10


def small_model(vocab=VOCAB, dim=64, layers=2):
    return [f"model.dim={dim}", f"model.n_layers={layers}", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=96",
            f"model.vocab_size={vocab}"]


def run_overrides(run_dir, cache, steps, *extra, layers=2, batch=4, seq=32):
    return [*small_model(layers=layers), f"train.seq_len={seq}", f"train.batch_size={batch}", f"train.steps={steps}", "train.eval_every=0",
            "train.log_every=1", "train.progress=false", "train.peak_flops=1e10", "train.threads=1",
            "optim.warmup_steps=2", f"train.run_dir={run_dir}", f"data.cache_dir={cache}", *extra]


def make_trainer(overrides, rank=0, world=1):
    from plait.launch.env import ProcessEnv
    from plait.train.config import load_config
    from plait.train.trainer import Trainer

    env = ProcessEnv(rank, 0, world, "torchrun") if world > 1 else None
    return Trainer(load_config(overrides), env=env)


# resharding ------------------------------------------------------------------------------
def after_load(trainer):
    """(loss on a fixed batch, losses of the next MORE_STEPS training steps), or None on ranks that
    do not hold the loss (pipeline stages before the last, dp/tp ranks other than 0)."""
    fixed = trainer.evaluate(batches=1)
    losses = [trainer.step()["loss"] for _ in range(MORE_STEPS)]
    trainer.close()
    grid = trainer.grid
    return (fixed, losses) if grid.pp_rank == grid.pp - 1 and grid.dp_rank == 0 and grid.tp_rank == 0 else None


def save_worker(rank, world, tmp, cache, layout, **shape):
    trainer = make_trainer(run_overrides(f"{tmp}/save", cache, 3 + MORE_STEPS, *layout,
                                         f"checkpoint.dir={tmp}/ckpt", **shape), rank, world)
    for _ in range(3):
        trainer.step()
    trainer.save_checkpoint()
    return after_load(trainer)


def load_worker(rank, world, tmp, cache, layout, name="", **shape):
    trainer = make_trainer(run_overrides(f"{tmp}/load-{world}{name}", cache, 3 + MORE_STEPS, *layout,
                                         f"train.resume={tmp}/ckpt", **shape), rank, world)
    assert trainer.step_num == 3
    return after_load(trainer)


def report_diffs(name, fixed, losses, saved):
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, saved[1]))
    print(f"reshard to {name}: fixed-batch loss rel diff {abs(fixed - saved[0]) / saved[0]:.1e}, "
          f"next {MORE_STEPS} steps max rel diff {worst:.1e}")


def the_result(results):
    found = [result for result in results if result is not None]
    assert len(found) == 1
    return found[0]


GRID_SAVE = ["parallel.tp=2", "parallel.pp=2", "parallel.vpp=2", "parallel.zero=1", "parallel.microbatches=4"]
GRID_LOADS = {"tp4-pp1-dp2": ["parallel.tp=4", "parallel.microbatches=4"],
              "tp1-pp4-dp2": ["parallel.pp=4", "parallel.microbatches=4"]}
GRID_SHAPE = {"layers": 4, "batch": 8}


def grid_worker(rank, world, tmp, cache):
    """On 8 ranks: train and save at tp2 x pp2 (vpp2) x dp2 with ZeRO-1, then load at two other layouts."""
    results = {"saved": save_worker(rank, world, tmp, cache, GRID_SAVE, **GRID_SHAPE)}
    for name, layout in GRID_LOADS.items():
        results[name] = load_worker(rank, world, tmp, cache, layout, name, **GRID_SHAPE)
    return results


@pytest.mark.slow
def test_reshard_across_tp_pp_vpp_dp_zero(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    results = run_ranks(8, grid_worker, str(tmp_path), str(cache))
    index = json.loads((latest_checkpoint(tmp_path / "ckpt") / "index.json").read_text())
    assert {key: index["layout"][key] for key in ("tp", "pp", "dp", "vpp", "zero")} == \
        {"tp": 2, "pp": 2, "dp": 2, "vpp": 2, "zero": 1}
    state_file = index["optimizer_state"]["layers.3.mlp.w13.weight"]["shards"]["1"]
    assert state_file in ("optim-tp01-pp01-part000.safetensors", "optim-tp01-pp01-part001.safetensors")  # 2 writers
    assert "layers.3.mlp.w13.weight/exp_avg_sq" in ShardReader(tmp_path / "ckpt").tensors(state_file)
    assert sorted(f for f in index["files"] if f.startswith("model-tp00-pp00")) == \
        ["model-tp00-pp00-part000.safetensors", "model-tp00-pp00-part001.safetensors"]
    saved = the_result([r["saved"] for r in results])
    loaded = {name: the_result([r[name] for r in results]) for name in GRID_LOADS}
    loaded["tp1-pp1-dp1"] = load_worker(0, 1, str(tmp_path), str(cache), ["parallel.microbatches=4"], "single",
                                        **GRID_SHAPE)
    for name, (fixed, losses) in loaded.items():
        report_diffs(name, fixed, losses, saved)
        assert fixed == pytest.approx(saved[0], rel=1e-6, abs=0), name
        assert losses == pytest.approx(saved[1], rel=1e-5, abs=0), name
    hf_loss = exported_fixed_loss(tmp_path, cache)
    print(f"exported tp2 x pp2 x vpp2 x dp2 checkpoint: transformers' fixed-batch loss rel diff "
          f"{abs(hf_loss - saved[0]) / saved[0]:.1e}")
    assert hf_loss == pytest.approx(saved[0], rel=1e-5, abs=0)


def test_writers_share_a_position_by_bytes_and_agree_in_any_order():
    """Each tensor has one writer; no writer gets more than its 1/parts of the bytes plus the largest tensor;
    the split depends on names and shapes only (any dict order), tp-sharded tensors counted at their tp size."""
    import random

    from plait.parallel.sharding import ShardSpec
    from plait.train.checkpoint import writers

    rng = random.Random(0)
    specs = {f"layers.{i}.w{j}": ShardSpec((rng.randint(1, 300), 64), dim=rng.choice([None, 0]))
             for i in range(9) for j in range(3)}
    sizes = {name: spec.local_shape(4)[0] * 64 for name, spec in specs.items()}
    for parts in (1, 2, 3, 8):
        owner = writers(specs, 4, parts)
        shuffled = dict(rng.sample(sorted(specs.items()), len(specs)))
        assert writers(shuffled, 4, parts) == owner
        load = [sum(sizes[n] for n, p in owner.items() if p == part) for part in range(parts)]
        assert sorted(owner) == sorted(specs) and set(owner.values()) == set(range(parts))
        assert max(load) <= sum(load) / parts + max(sizes.values()), (parts, load)
    assert set(writers(specs, 4, 1).values()) == {0}


def exported_fixed_loss(tmp_path, cache):
    """`plait export` of the 8-rank checkpoint, loaded by transformers: its loss on the same fixed batch."""
    transformers = pytest.importorskip("transformers")
    from plait.train.export import export_checkpoint

    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                          dtype=torch.float32).eval()
    trainer = make_trainer(run_overrides(tmp_path / "hf-batch", cache, 3, "parallel.microbatches=4", **GRID_SHAPE))
    batch = trainer.loader.val_batch(0)
    trainer.close()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(micro[:, :-1]).logits.flatten(0, 1), micro[:, 1:].flatten())
                  for micro in batch]
    return float(sum(losses) / len(losses))


# kill -9 and resume ----------------------------------------------------------------------
def read_losses(run_dir):
    """{step: loss} from metrics.jsonl, the last record of each step winning (a resumed run appends)."""
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def logged_steps(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return max((record["step"] for record in lines), default=0)


def kill_tree(pid):
    """SIGKILL a launched process and every process under it (torchrun starts its workers in new sessions)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


class Run:
    """One launched training command, its output in a file (a pipe could fill and block it)."""

    def __init__(self, command, overrides, env, log_path):
        self.log_path = Path(log_path)
        with open(self.log_path, "w") as log_file:
            self.process = subprocess.Popen([*command, *overrides], env=env, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout=600):
        self.process.wait(timeout=timeout)
        return self.process.returncode

    @property
    def output(self):
        return self.log_path.read_text()


def wait_for_step(run, run_dir, step):
    while logged_steps(run_dir) < step and run.process.poll() is None:
        time.sleep(0.002)


def wait_for_checkpoint(run, checkpoints, step):
    """Until `latest` names a checkpoint at `step` or later (a background save lands a step or more after its own,
    later still on a loaded machine), or the run has ended."""
    while run.process.poll() is None:
        latest = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
        if latest is not None and int(latest.name[5:]) >= step:
            return
        time.sleep(0.002)


def signal_one_rank(run, sig):
    """Send `sig` to the last worker (torchrun) or to the process itself (one rank)."""
    import psutil

    children = psutil.Process(run.process.pid).children(recursive=True)
    workers = [c for c in children if "plait.train" in " ".join(c.cmdline())] or [psutil.Process(run.process.pid)]
    workers[-1].send_signal(sig)


def kill_and_resume(tmp_path, cache, command, layout, steps=20):
    """Reference run; a run killed (SIGKILL, every process) after step 11 is logged and step 10's checkpoint is
    whole; its resume, preempted (SIGTERM to one rank) after step 14; and a second resume. Returns their losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = [*layout, "checkpoint.every=5", "checkpoint.keep=2"]
    shape = {"seq": 128, "batch": 8}  # steps long enough that the kill and the signal land mid-run
    reference = Run(command, run_overrides(tmp_path / "reference", cache, steps, *common, **shape), env,
                    tmp_path / "ref.log")
    run_dir = tmp_path / "killed"
    killed = Run(command, run_overrides(run_dir, cache, steps, *common, **shape), env, tmp_path / "killed.log")
    wait_for_step(killed, run_dir, 11)
    checkpoints = run_dir / "checkpoints"
    wait_for_checkpoint(killed, checkpoints, 10)  # step 10's save runs in the background: kill once it is whole
    kill_tree(killed.process.pid)
    assert killed.wait() == -signal.SIGKILL, f"the run ended before the kill:\n{killed.output}"
    assert logged_steps(run_dir) < steps
    latest = latest_checkpoint(checkpoints)
    assert latest.name in ("step-00000010", "step-00000015")
    leftover = checkpoints / ".tmp-step-00000099"  # what a kill during a save leaves behind
    leftover.mkdir(exist_ok=True)
    (leftover / "model-tp00-pp00.safetensors").write_bytes(b"half written")

    resumed = Run(command, run_overrides(run_dir, cache, steps, *common, "train.resume=auto", **shape), env,
                  tmp_path / "resumed.log")
    wait_for_step(resumed, run_dir, 14)
    signal_one_rank(resumed, signal.SIGTERM)
    code = resumed.wait()
    output = resumed.output
    assert f"resumed from {latest} at step {int(latest.name[5:])}" in output, output
    assert not leftover.exists()
    preempted = latest_checkpoint(checkpoints)
    stopped_at = int(preempted.name[5:])
    assert 14 <= stopped_at < steps, output
    assert code == (REQUEUE_EXIT_CODE if len(command) == 3 else 1), output  # torchrun: a failed worker is 1
    assert ShardReader(preempted).rank_state(0)["step"] == stopped_at

    final = Run(command, run_overrides(run_dir, cache, steps, *common, "train.resume=auto", **shape), env,
                tmp_path / "final.log")
    assert final.wait() == 0, final.output
    assert f"at step {stopped_at}" in final.output
    assert reference.wait() == 0, reference.output
    return read_losses(tmp_path / "reference"), read_losses(run_dir), stopped_at


KILL_LAYOUTS = {1: [], 4: ["parallel.tp=2", "parallel.zero=1"]}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", sorted(KILL_LAYOUTS))
def test_kill_preempt_and_resume_are_exact(tmp_path, stdlib_tokens, ranks):
    cache = stdlib_tokens[0].parent.parent
    command = [sys.executable, "-m", "plait.train"]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "plait.train"]
    layout = KILL_LAYOUTS[ranks]
    reference, resumed, stopped_at = kill_and_resume(tmp_path, cache, command, layout)
    assert sorted(reference) == list(range(1, 21))
    assert len(set(reference.values())) == 20 and min(reference.values()) > 1.0  # real, changing losses
    assert [resumed[step] for step in range(11, 21)] == [reference[step] for step in range(11, 21)]
    kept = sorted(path.name for path in (tmp_path / "killed" / "checkpoints").iterdir())
    saved = sorted({stopped_at, 20, *(step for step in (15,) if step > stopped_at)})  # keep=2: the last two
    assert kept == ["latest", *(f"step-{step:08d}" for step in saved[-2:])]


# damaged and foreign input ------------------------------------------------------------------
@pytest.fixture
def saved_run(tmp_path, stdlib_tokens):
    """A 2-step single-process run checkpointed every step (keep 2)."""
    cache = stdlib_tokens[0].parent.parent
    overrides = run_overrides(tmp_path / "run", cache, 3, "checkpoint.every=1", "checkpoint.keep=2")
    trainer = make_trainer(overrides)
    trainer.fit()
    return tmp_path, cache, overrides


def test_keep_last_and_layout_record(saved_run):
    tmp_path, _, _ = saved_run
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    reader = ShardReader(root)
    index = reader.index
    assert index["step"] == 3 and index["layout"] == {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1,
                                                      "vpp": 1, "zero": 0, "sequence_parallel": False}
    for name, record in index["files"].items():
        assert (reader.path / name).stat().st_size == record["bytes"]
    state = reader.rank_state(0)
    assert state["step"] == 3 and state["config"]["model"]["vocab_size"] == VOCAB
    assert reader.tensors("optim-tp00-pp00.safetensors")["layers.1.mlp.w2.weight/exp_avg"].shape == (64, 96)
    assert not any(p.suffix == ".pkl" or p.name.endswith((".pt", ".bin")) for p in reader.path.iterdir())
    for name in ("model-tp00-pp00.safetensors", "optim-tp00-pp00.safetensors"):  # the reference reader agrees
        reference = safetensors.torch.load_file(reader.path / name)
        ours = reader.tensors(name)
        assert sorted(reference) == sorted(ours) and all(torch.equal(reference[k], ours[k]) for k in ours)


def test_milestones_outlive_the_last_k(tmp_path, stdlib_tokens):
    """checkpoint.keep=1 with checkpoint.keep_every=4: of the saves at 2, 4, ..., 10 the milestones 4 and 8 stay
    beside the newest; a resume still takes the newest."""
    cache = stdlib_tokens[0].parent.parent
    overrides = run_overrides(tmp_path / "run", cache, 10, "checkpoint.every=2", "checkpoint.keep=1",
                              "checkpoint.keep_every=4")
    trainer = make_trainer(overrides)
    trainer.fit()
    trainer.close()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000008", "step-00000010"]
    assert latest_checkpoint(root).name == "step-00000010"


def _resume_error(overrides, target):
    with pytest.raises(CheckpointError) as caught:
        make_trainer([*overrides, f"train.resume={target}"])
    return str(caught.value)


def test_damaged_checkpoints_are_named(saved_run):
    tmp_path, _, overrides = saved_run
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    model_file = checkpoint / "model-tp00-pp00.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[:len(data) // 2])
    message = _resume_error(overrides, checkpoint)
    assert str(model_file) in message and "truncated" in message

    flipped = bytearray(data)
    flipped[len(data) - 100] ^= 0x01
    model_file.write_bytes(bytes(flipped))
    message = _resume_error(overrides, checkpoint)
    assert str(model_file) in message and "fails its crc32c check" in message

    from plait.train.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=f"train.resume={tmp_path / 'nowhere'} does not exist"):
        validate(load_config([*overrides, f"train.resume={tmp_path / 'nowhere'}"]))  # before any process group
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'run'} holds no complete checkpoint"):
        make_trainer([*overrides, f"train.resume={tmp_path / 'run'}"])


def test_format_1_checkpoints_checked_with_zlib_crc32_still_resume(saved_run):
    """Version 1 indexes record zlib's CRC-32 per file; they still load, to the same tensors, and a flipped
    byte is still caught."""
    import zlib

    tmp_path, _, overrides = saved_run
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    index_file = checkpoint / "index.json"
    index = json.loads(index_file.read_text())
    index["version"] = 1
    for name, record in index["files"].items():
        del record["crc32c"]
        record["crc32"] = zlib.crc32((checkpoint / name).read_bytes())
    index_file.write_text(json.dumps(index))
    trainer = make_trainer([*overrides, f"train.resume={checkpoint}"])
    saved = ShardReader(checkpoint).tensors("model-tp00-pp00.safetensors")
    assert trainer.step_num == 3 and set(saved) == set(trainer.named_params)
    assert all(torch.equal(saved[name], param.detach()) for name, param in trainer.named_params.items())
    trainer.close()
    model_file = checkpoint / "model-tp00-pp00.safetensors"
    flipped = bytearray(model_file.read_bytes())
    flipped[-100] ^= 0x01
    model_file.write_bytes(bytes(flipped))
    message = _resume_error(overrides, checkpoint)
    assert str(model_file) in message and "fails its crc32 check" in message


def test_other_model_shape_names_the_keys(saved_run):
    tmp_path, cache, _ = saved_run
    other = run_overrides(tmp_path / "other", cache, 3, "model.ffn_dim=128")
    message = _resume_error(other, tmp_path / "run" / "checkpoints")
    assert "layers.0.mlp.w13.weight" in message and "[192, 64]" in message and "[256, 64]" in message
    deeper = run_overrides(tmp_path / "other", cache, 3, "model.n_layers=3")
    message = _resume_error(deeper, tmp_path / "run" / "checkpoints")
    assert "missing: layers.2." in message


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    trainer = make_trainer(run_overrides(tmp_path / "fresh", cache, 3, "train.resume=auto"))
    assert trainer.step_num == 0
    trainer.close()


def test_init_from_checkpoint_or_hf_directory(saved_run):
    from plait.train.reshard import load_full_model
    from plait.train.export import export_checkpoint

    tmp_path, cache, _ = saved_run
    root = tmp_path / "run" / "checkpoints"
    _, saved = load_full_model(root)
    export_checkpoint(root, tmp_path / "hf")
    for source in (root, tmp_path / "hf"):
        trainer = make_trainer(run_overrides(tmp_path / "init", cache, 3, f"checkpoint.init_from={source}"))
        assert trainer.step_num == 0 and not trainer.optimizer.state
        for name, param in trainer.named_params.items():
            assert torch.equal(param[:saved[name].shape[0]], saved[name]), (source, name)
        trainer.close()


@pytest.mark.gpu
def test_resume_on_cuda(tmp_path, stdlib_tokens):
    """The CUDA path: parameters and optimizer state move through the CPU files, the CUDA RNG is saved."""
    cache = stdlib_tokens[0].parent.parent
    overrides = run_overrides(tmp_path / "gpu", cache, 6, "train.device=cuda", "checkpoint.every=3")
    trainer = make_trainer(overrides)
    losses = [trainer.step()["loss"] for _ in range(3)]
    trainer.save_checkpoint()
    losses += [trainer.step()["loss"] for _ in range(3)]
    trainer.close()
    resumed = make_trainer([*overrides, f"train.resume={tmp_path / 'gpu' / 'checkpoints'}"])
    assert resumed.step_num == 3 and next(iter(resumed.named_params.values())).is_cuda
    # CUDA kernels with atomics (embedding backward) are not bitwise reproducible run to run
    assert [resumed.step()["loss"] for _ in range(3)] == pytest.approx(losses[3:], rel=1e-5)
    resumed.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_restores_the_dropout_streams(tmp_path, stdlib_tokens, device):
    """Dropout draws from the parallel RNG's generators on the device (CUDA generators on a GPU): a resumed
    run draws the same masks, and a run whose streams moved draws others."""
    cache = stdlib_tokens[0].parent.parent
    overrides = run_overrides(tmp_path / "drop", cache, 6, f"train.device={device}", "model.dropout=0.2",
                              "train.compile=false")
    trainer = make_trainer(overrides)
    [trainer.step() for _ in range(3)]
    trainer.save_checkpoint()
    continued = [trainer.step()["loss"] for _ in range(3)]
    trainer.close()
    resumed = make_trainer([*overrides, f"train.resume={tmp_path / 'drop' / 'checkpoints'}"])
    assert resumed.chunks[0].rng.sharded.device.type == device
    assert [resumed.step()["loss"] for _ in range(3)] == pytest.approx(continued, rel=1e-5)
    resumed.close()
    shifted = make_trainer([*overrides, f"train.resume={tmp_path / 'drop' / 'checkpoints'}"])
    rng = shifted.chunks[0].rng  # one draw moves both streams: the masks, and so the losses, must change
    torch.rand(1, generator=rng.replicated, device=device), torch.rand(1, generator=rng.sharded, device=device)
    assert [shifted.step()["loss"] for _ in range(3)] != pytest.approx(continued, rel=1e-5)
    shifted.close()
