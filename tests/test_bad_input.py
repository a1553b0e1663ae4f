"""Bad input, drawn at random: every override set is accepted, or refused in one line with exit 2.

Hypothesis draws override lists mixing good settings with unknown keys (with and without `+`),
wrong types, out-of-range numbers, unknown choices of every table, impossible layouts and
unwritable paths. Each goes through `load_config` + `validate` (accepted, or one ConfigError
sentence) and through the CLIs in-process in their planning modes (`plait-train
train.dry_run=true`, `plait-launch launch.dry_run=true`, `plait plan`: accepted, or exactly one
`error:` line on stderr and exit status 2; never a traceback, never another exception).
Seeded (derandomized), so CI sees the same examples every run.

Beside it, the faults that need a run: nan loss, a full checkpoint disk, Ctrl-C, a failed
start, a resumed run's metrics, a checkpoint past train.steps, out-of-vocabulary shards.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_utils import free_port
from plait.train.config import ConfigError, load_config, validate

NUMBERS = {  # key -> values that may or may not be in range
    "train.steps": st.integers(-3, 20), "train.seq_len": st.integers(-2, 4096), "train.batch_size": st.integers(-2, 33),
    "train.log_every": st.integers(-2, 5), "train.eval_every": st.integers(-2, 5), "train.threads": st.integers(-3, 4),
    "train.peak_flops": st.sampled_from(["-1", "0", "1e12", "nan"]), "optim.lr": st.sampled_from(["-1", "0", "3e-4", "1e9", "inf"]),
    "optim.warmup_steps": st.integers(-10, 10), "optim.weight_decay": st.sampled_from(["-0.1", "0", "0.1"]),
    "optim.betas": st.sampled_from(["[1.5,0.9]", "[0.9,0.95]", "[0.9]", "[-0.1,0.5]"]),
    "optim.grad_clip": st.sampled_from(["-1", "0", "1.0"]), "optim.min_lr_ratio": st.sampled_from(["-1", "0.1", "2"]),
    "checkpoint.every": st.integers(-2, 3), "checkpoint.keep": st.integers(-2, 3),
    "model.dropout": st.sampled_from(["-0.1", "0", "0.1", "1", "1.5"]), "model.dim": st.sampled_from(["0", "64", "96"]),
    "model.n_heads": st.integers(0, 9), "model.n_kv_heads": st.integers(0, 9), "model.n_layers": st.integers(0, 5),
    "model.norm_eps": st.sampled_from(["0", "-1e-5", "1e-5"]), "data.val_fraction": st.sampled_from(["-0.1", "0", "0.5", "1", "2"]),
    "parallel.tp": st.integers(-1, 9), "parallel.pp": st.integers(-1, 5), "parallel.vpp": st.integers(-1, 3),
    "parallel.microbatches": st.integers(-1, 9), "parallel.zero": st.integers(-1, 4),
    "launch.nodes": st.integers(-1, 3), "launch.procs_per_node": st.integers(-1, 9),
    "offload.keep_last": st.sampled_from(["auto", "-1", "2", "lots"]), "offload.min_bytes": st.integers(-1, 10),
    "train.loss_scale": st.sampled_from(["-1", "0", "1024", "null", "big"]),
    "train.loss_scale_window": st.integers(-1, 3),
    "model.moe_experts": st.integers(-1, 5), "model.moe_top_k": st.integers(-1, 3), "parallel.ep": st.integers(-1, 3),
    "model.moe_shared_ffn_dim": st.sampled_from(["-8", "0", "30", "64"]),
    "model.moe_z_loss": st.sampled_from(["-1", "0", "0.001"]),
    "model.moe_capacity_factor": st.sampled_from(["-1", "0", "null", "1.25"]),
    "model.moe_bias_update_rate": st.sampled_from(["-0.1", "0", "0.001"]),
}
CHOICES = {  # key -> names, some of which are not in the table that builds them
    "optim.name": ["adamw", "lion", "adam", "sgd"], "optim.schedule": ["cosine", "cosin", "linear", "wsd", "step"],
    "optim.decay_shape": ["sqrt", "linear", "exponential"],
    "optim.impl": ["auto", "foreach", "fastest"], "parallel.schedule": ["1f1b", "gpipe", "zbv", "interleaved"],
    "parallel.pp_transport": ["auto", "shm", "carrier-pigeon"], "parallel.backend": ["auto", "gloo", "mpi"],
    "train.device": ["cpu", "auto", "tpu"], "train.precision": ["fp32", "bf16", "fp8", "int4"],
    "train.compile": ["auto", "false", "sometimes"], "logging.level": ["INFO", "debug", "LOUD"],
    "logging.wandb.mode": ["disabled", "offline", "bogus"], "offload.backend": ["none", "host", "tape"],
    "offload.policy": ["offload", "keep", "maybe"], "data.tokenizer": ["byte", "sentencepiece"],
    "model.moe_drop_policy": ["probs", "position", "random"],
    "model.moe_aux_loss_type": ["aux_loss", "global_aux_loss", "sinkhorn"],
    "model.moe_score_function": ["softmax", "sigmoid", "relu"],
    "parallel.tp_overlap": ["auto", "true", "sometimes"],
}
GROUPS = {"model": ["tiny", "small", "no-such-preset"], "optim": ["adamw", "lion", "sgd"], "launch": ["local", "nosuch"]}
TYPES = ["train.steps=abc", "optim.lr=fast", "parallel.tp=1.5", "model.tie_embeddings=maybe", "train.seq_len=[1,2]"]
UNKNOWN = ["+train.bogus=1", "+model.widht=64", "train.bogus=1", "+optim.momentum=0.9", "+nope=1"]


def paths(root: Path):
    (root / "a-file").write_text("x")
    return [f"train.run_dir={root / 'a-file' / 'run'}", f"checkpoint.dir={root / 'a-file'}",
            f"train.run_dir={root / 'fine'}", f"data.path={root / 'missing'}", "offload.backend=file",
            f"offload.path={root / 'a-file'}", "train.resume=/no/such/checkpoint"]


def overrides_strategy(root: Path):
    numbers = st.sampled_from(sorted(NUMBERS)).flatmap(lambda key: NUMBERS[key].map(lambda v: f"{key}={v}"))
    choices = st.sampled_from(sorted(CHOICES)).flatmap(lambda key: st.sampled_from(CHOICES[key]).map(
        lambda v: f"{key}={v}"))
    groups = st.sampled_from(sorted(GROUPS)).flatmap(lambda key: st.sampled_from(GROUPS[key]).map(
        lambda v: f"{key}={v}"))
    one = st.one_of(numbers, choices, groups, st.sampled_from(TYPES + UNKNOWN + paths(root)))
    return st.lists(one, min_size=1, max_size=4, unique_by=lambda text: text.split("=")[0])


def one_sentence(text: str) -> bool:
    return bool(text) and "\n" not in text and "Traceback" not in text


FUZZ = settings(max_examples=70, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bad-input")


def test_load_config_and_validate_accept_or_refuse_in_one_sentence(root):
    @FUZZ
    @given(overrides_strategy(root), st.sampled_from([1, 2, 4, 6]))
    def check(overrides, world):
        try:
            cfg = load_config(overrides)
        except Exception:  # composition refused it (Hydra): the CLIs turn that into one line, tested below
            return
        try:
            validate(cfg, world)
        except ConfigError as error:
            assert one_sentence(str(error)), repr(str(error))

    check()


REPORTED = [  # what the review found accepted or a traceback, each with the words of its sentence now
    (["+train.bogus=1"], "train.bogus is not a setting of plait"), (["train.steps=-5"], "train.steps=-5 must be >= 1"),
    (["train.steps=0"], "train.steps=0 must be >= 1"), (["logging.level=LOUD"], "logging.level=LOUD is not one of"),
    (["checkpoint.every=-1"], "checkpoint.every=-1 must be >= 0"), (["checkpoint.keep=-1"], "checkpoint.keep=-1 must"),
    (["optim.warmup_steps=-10"], "optim.warmup_steps=-10 must be >= 0"), (["train.threads=-3"], "train.threads=-3"),
    (["train.eval_every=-1"], "train.eval_every=-1 must be >= 0"), (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    (["optim.betas=[1.5,0.9]"], "optim.betas[0]=1.5 must be >= 0 and < 1"), (["train.seq_len=0"], "train.seq_len=0"),
    (["train.log_every=0"], "train.log_every=0 must be >= 1"), (["logging.wandb.mode=bogus"], "logging.wandb.mode=bogus"),
    (["train.device=tpu"], "train.device=tpu is not one of auto, cpu, cuda"),
    (["data.val_fraction=2"], "data.val_fraction=2.0 must be >= 0 and < 1"),
    (["parallel.zero=4"], "parallel.zero=4 is not one of 0, 1, 2, 3"), (["optim.schedule=cosin"], "optim.schedule=cosin is not"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be >= 0 and < 1"), (["launch=slurm", "launch.nodes=0"],
                                                                          "launch.nodes=0 must be >= 1"),
    (["model.moe_experts=4", "model.moe_aux_loss_type=sinkhorn"], "model.moe_aux_loss_type=sinkhorn is not one of"),
    (["parallel.train_timeout_s=0"], "parallel.train_timeout_s=0 must be a positive integer"),
    (["parallel.timeout_s=-5"], "parallel.timeout_s=-5 must be a positive integer"),
    (["model.moe_aux_loss_type=seq_aux_loss"], "model.moe_aux_loss_type=seq_aux_loss sets up a mixture of experts"),

    (["parallel.tp_overlap=true", "parallel.pp=2", "parallel.schedule=zbh1"],
     "parallel.tp_overlap=true makes each column-parallel layer one autograd node"),
    (["parallel.tp_overlap=maybe"], "parallel.tp_overlap=maybe is not one of auto, true, false"),
    (["train.precision=fp8", "parallel.tp_overlap=true"],
     "train.precision=fp8 runs the column-parallel layers' GEMMs through autograd"),
    (["train.precision=fp8", "model.ffn_dim=100"],
     "sizes must be multiples of 16, but the MLP width / parallel.tp is 100"),
]


@pytest.mark.parametrize("overrides,words", REPORTED, ids=[" ".join(r[0]) for r in REPORTED])
def test_each_reported_bad_setting_is_one_sentence(overrides, words):
    with pytest.raises(ConfigError) as info:
        validate(load_config(overrides), 1)
    assert words in str(info.value) and one_sentence(str(info.value)), str(info.value)


def test_unwritable_paths_are_found_before_any_work(root):
    (root / "a-file").write_text("x")
    for key in ("train.run_dir", "checkpoint.dir"):
        with pytest.raises(ConfigError, match=rf"{key}=.*a-file.* is not a writable directory \(.*is a file"):
            validate(load_config([f"{key}={root / 'a-file' / 'x'}"]), 1)
    assert not (root / "a-file").is_dir()


def run_cli(main, argv, capsys, monkeypatch):
    """(exit status, stderr) of a console entry point run in this process."""
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    try:
        main()
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("program", ["plait-train", "plait-launch", "plait plan"])
def test_clis_accept_or_end_in_one_line_with_status_2(root, capsys, monkeypatch, program):
    from plait.train.cli import main as train_main
    from plait.train.launch_cli import main as launch_main
    from plait.train.tools import main as tools_main

    monkeypatch.chdir(root)

    @settings(max_examples=12, derandomize=True, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(overrides_strategy(root))
    def check(overrides):
        if program == "plait-train":
            status, err = run_cli(train_main, ["plait-train", *overrides, "train.dry_run=true",
                                               "launch.world_size=4"], capsys, monkeypatch)
        elif program == "plait-launch":
            status, err = run_cli(launch_main, ["plait-launch", *overrides, "launch=slurm", "launch.dry_run=true"],
                                  capsys, monkeypatch)
        else:
            status, err = run_cli(lambda: tools_main(["plan", *overrides, "launch.world_size=4"]), ["plait"],
                                  capsys, monkeypatch)
        lines = [line for line in err.splitlines() if line.strip() and "WARNING" not in line]
        assert status in (0, 2), (overrides, status, err[-3000:])
        if status == 2:
            assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, (overrides, err[-3000:])

    check()


# faults that need a run ----------------------------------------------------------------------------
SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "train.seq_len=16",
         "train.batch_size=4", "train.eval_every=0", "train.log_every=1", "train.progress=false",
         "train.peak_flops=1e10", "train.threads=1", "optim.warmup_steps=1"]


def plait_train(tmp_path, *extra, env=None, timeout=300):
    command = [sys.executable, "-m", "plait.train", *SMALL, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def error_lines(result) -> list:
    return [line for line in result.stderr.splitlines() if ": error: " in line]


def test_nan_loss_is_one_line_and_keeps_the_checkpoint(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    result = plait_train(tmp_path, "optim.lr=1e9", "optim.grad_clip=0", "train.steps=30", "checkpoint.every=1",
                         f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert "loss is" in line and "lower optim.lr" in line and "Traceback" not in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_a_failed_start_leaves_no_run_directory(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    result = plait_train(tmp_path, "train.steps=2", f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                         f"train.resume={tmp_path / 'empty'}", env={})
    assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr[-2000:]
    (tmp_path / "empty").mkdir()
    result = plait_train(tmp_path, "train.steps=2", f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                         f"train.resume={tmp_path / 'empty'}")
    assert result.returncode == 2 and "holds no complete checkpoint" in error_lines(result)[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_full_checkpoint_disk_names_the_directory_and_keeps_the_previous(tmp_path, stdlib_tokens, monkeypatch,
                                                                        background):
    import errno

    from plait.train import checkpoint as checkpoint_lib
    from plait.train.trainer import Trainer

    cache = stdlib_tokens[0].parent.parent
    trainer = Trainer(load_config(SMALL + ["train.steps=4", f"train.run_dir={tmp_path}", f"data.cache_dir={cache}",
                                           f"checkpoint.async_save={background}"]))
    trainer.step()
    first = trainer.save_checkpoint()
    trainer.checkpointer.wait()  # the first checkpoint is whole on disk before the disk fills (async: not a race)
    trainer.step()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for writer in ("write_safetensors", "write_arena"):  # streamed or from the host buffers: the disk is full
        monkeypatch.setattr(checkpoint_lib, writer, full)
    with pytest.raises(checkpoint_lib.CheckpointError) as info:
        trainer.save_checkpoint()  # in the background: the failure surfaces when the write is waited for
        trainer.checkpointer.wait()
    message = str(info.value)
    assert f"checkpoint.dir={tmp_path / 'checkpoints'}" in message and "No space left" in message
    assert f"the previous checkpoint {first} is intact" in message and "\n" not in message
    assert checkpoint_lib.latest_checkpoint(tmp_path / "checkpoints") == first
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    trainer.close()


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    command = [sys.executable, "-m", "plait.train", *SMALL, "train.steps=100000", "checkpoint.every=0",
               f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    (line,) = [line for line in stderr.splitlines() if ": error: " in line]
    assert "interrupted (Ctrl-C) after step" in line and "resume with train.resume=auto" in line
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    from plait.train.checkpoint import latest_checkpoint

    step = int(line.split("after step ")[1].split(";")[0])
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == f"step-{step:08d}"


def test_resume_forgets_logged_steps_past_the_checkpoint_and_refuses_one_past_train_steps(tmp_path, stdlib_tokens):
    import json

    from plait.train.trainer import Trainer

    cache = stdlib_tokens[0].parent.parent
    common = SMALL + [f"train.run_dir={tmp_path}", f"data.cache_dir={cache}", "checkpoint.save_final=false",
                      "checkpoint.every=3"]
    trainer = Trainer(load_config(common + ["train.steps=6"]))
    trainer.fit()  # logs steps 1..6, checkpoints at 3 and 6
    (tmp_path / "checkpoints" / "step-00000006").rename(tmp_path / "checkpoints" / ".gone")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000003\n")  # as if killed after step 6's log
    resumed = Trainer(load_config(common + ["train.steps=6", "train.resume=auto"]))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert resumed.step_num == 3 and steps == [1, 2, 3]
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(Exception, match=r"is at step 6, past train.steps=4; raise train.steps"):
        Trainer(load_config(common + ["train.steps=4", "train.resume=auto"]))
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099\n")
    with pytest.raises(Exception, match=r"latest names step-00000099, which is missing or incomplete; pass "):
        Trainer(load_config(common + ["train.steps=9", f"train.resume={tmp_path / 'checkpoints'}"]))


def test_resuming_with_another_optimizer_is_one_line_naming_the_saved_one(tmp_path, stdlib_tokens):
    """A Lion checkpoint resumed with optim=adamw once died in torch's AdamW (KeyError: 'step'); now one line names
    the saved optimizer and the way to keep only its weights, which then trains."""
    cache = stdlib_tokens[0].parent.parent
    common = [f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}", "train.eval_every=0"]
    first = plait_train(tmp_path, "optim=lion", "train.steps=2", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    result = plait_train(tmp_path, "optim=adamw", "train.steps=4", "train.resume=auto", *common)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = error_lines(result)
    saved = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert f"{saved} was trained with optim=lion and holds its state; resume with optim=lion, or start from its " \
           f"weights with a fresh optimizer: checkpoint.init_from={saved} train.resume=none." in line
    fresh = plait_train(tmp_path, "optim=adamw", "train.steps=2", f"checkpoint.init_from={saved}",
                        f"train.run_dir={tmp_path / 'other'}", f"data.cache_dir={cache}", "train.eval_every=0")
    assert fresh.returncode == 0, fresh.stderr[-2000:]


def megatron_shard(prefix: Path, top: int) -> None:
    from plait.data.shards import ShardWriter

    prefix.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(prefix, np.uint16)
    writer.add(np.arange(4000) % (top + 1))
    writer.close()


@pytest.mark.parametrize("tp", [1, 2])
def test_token_ids_past_the_vocabulary_are_refused_at_any_tp(tmp_path, tp):
    megatron_shard(tmp_path / "shards" / "part", top=300)  # no meta.json: ids up to 300, model vocab 256
    extra = ["model.vocab_size=256", f"data.path={tmp_path / 'shards'}", "train.steps=2", f"parallel.tp={tp}",
             f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    if tp == 1:
        result = plait_train(tmp_path, *extra)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "plait.train", *SMALL, *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    lines = error_lines(result)
    assert lines and "holds token id 300 but model.vocab_size=256" in lines[0], result.stderr[-3000:]
    assert len([line for line in lines if line.startswith("plait-train: error:")]) == 1  # rank 0 alone says it
    assert not (tmp_path / "run").exists()


def test_export_names_its_own_problems(tmp_path, capsys):
    from plait.train.tools import main as tools_main

    (tmp_path / "a-file").write_text("x")
    for args, words in ((["export", str(tmp_path / "nonexistent"), str(tmp_path / "out")], "does not exist; pass a "
                         "checkpoint directory"),
                        (["export", str(tmp_path), str(tmp_path / "a-file")], "cannot take the export (it is a file")):
        with pytest.raises(SystemExit) as exited:
            tools_main(args)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and words in err and "train.resume" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_a_full_offload_disk_mid_run_is_one_line(tmp_path, stdlib_tokens, capsys, monkeypatch):
    import errno

    from plait.offload import files
    from plait.train.cli import run

    cache = stdlib_tokens[0].parent.parent
    cfg = load_config(SMALL + ["train.steps=3", f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                               "offload=file", f"offload.path={tmp_path / 'scratch'}", "offload.device_filter=all",
                               "offload.min_bytes=1024"])

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.FileStore, "write_bytes", full)
    with pytest.raises(SystemExit) as exited:
        run(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(lines) == 1 and "offload.path=" in lines[0] and "is full" in lines[0], err


def test_a_rank_that_lost_a_peer_leaves_while_a_background_save_still_waits():
    """The lost-peer exit does not join background threads: a checkpoint writer stuck in a collective with the
    lost rank would otherwise keep this rank alive, and its peers waiting on it, until the launcher kills them."""
    code = ("import threading, concurrent.futures\n"
            "from plait.train.cli import fail\n"
            "writer = concurrent.futures.ThreadPoolExecutor(1)\n"
            "writer.submit(threading.Event().wait)  # never returns, as a collective with a dead rank\n"
            "fail('rank 1 lost contact with another rank', at_once=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "plait-train: error: rank 1 lost contact with another rank"


def two_ranks(command, tmp_path, env=None):
    """`command` as ranks 0 and 1 of a two-process world (no launcher), on a free port."""
    port = free_port()
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                  "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                  **(env or {})})
            for rank in range(2)]


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_a_stuck_rank_ends_the_job_after_the_train_timeout(tmp_path, stdlib_tokens, layout):
    """Rank 1 stops for 120 s before its third step; with parallel.train_timeout_s=3, rank 0 gives up waiting in
    that step's grad all-reduce (dp2) or for its pipeline message over shared memory (pp2) and leaves with one
    line naming the setting, long before rank 1 wakes (the 600 s start-up timeout would have held it)."""
    cache = stdlib_tokens[0].parent.parent
    command = [sys.executable, "-m", "plait.train", *SMALL, "train.steps=6", "parallel.train_timeout_s=3",
               f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
               *(["parallel.pp=2", "parallel.microbatches=2"] if layout == "pp2" else [])]
    ranks = two_ranks(command, tmp_path, {"PLAIT_FAULT_AT_STEP": "2", "PLAIT_FAULT_RANK": "1",
                                          "PLAIT_FAULT_STALL_S": "120"})
    try:
        _, err = ranks[0].communicate(timeout=90)
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode == 2, err[-3000:]
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    assert "rank 0 waited longer than the collective timeout" in line and "parallel.train_timeout_s=3" in line
    assert "no checkpoint was written yet" in line and "Traceback" not in err


def test_a_killed_peer_is_one_line_on_the_survivor(tmp_path, stdlib_tokens):
    """Two ranks started as torchrun would start them; rank 1 is killed with SIGKILL mid-run, and rank 0
    ends with one line saying so (exit 2), not gloo's traceback."""
    cache = stdlib_tokens[0].parent.parent
    command = [sys.executable, "-m", "plait.train", *SMALL, "train.steps=100000", f"train.run_dir={tmp_path / 'run'}",
               f"data.cache_dir={cache}"]
    ranks = two_ranks(command, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 2):
        time.sleep(0.2)
    ranks[1].kill()
    _, err = ranks[0].communicate(timeout=180)
    ranks[1].communicate(timeout=30)
    assert ranks[0].returncode == 2, err[-3000:]
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    assert "rank 0 lost contact with another rank" in line and "resume with train.resume=auto" in line
    assert "Traceback" not in err
