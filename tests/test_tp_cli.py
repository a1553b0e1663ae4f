"""`plait-train parallel.tp=2` under torchrun trains with the same loss curve as tp=1, and bad
tp settings stop before training with one line and exit status 2."""

import json
import os
import subprocess
import sys

import pytest

from plait.train.config import ConfigError, load_config, validate

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "train.seq_len=32", "train.batch_size=4",
        "train.steps=4", "train.log_every=1", "train.eval_every=0", "train.progress=false", "train.peak_flops=1e10"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return dict(env, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **extra)


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_torchrun_tp2_loss_curve_matches_tp1(tmp_path, stdlib_tokens):
    cache = stdlib_tokens[0].parent.parent
    common = TINY + [f"data.cache_dir={cache}"]
    one = subprocess.run([sys.executable, "-m", "plait.train", f"train.run_dir={tmp_path / 'tp1'}", *common],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "plait.train", "parallel.tp=2", "parallel.sequence_parallel=true",
                          f"train.run_dir={tmp_path / 'tp2'}", *common],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "tp 2" in two.stdout  # the layout line: really two tensor-parallel ranks
    reference, losses = _losses(tmp_path / "tp1"), _losses(tmp_path / "tp2")
    assert len(reference) == 4 and reference[-1] < reference[0]
    assert losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("overrides, world, fragment", [
    (["parallel.tp=3", "model.dim=96", "model.n_heads=4"], 3, "parallel.tp=3 does not divide model.n_heads=4"),
    (["parallel.tp=2", "model.n_kv_heads=1"], 2, "parallel.tp=2 does not divide model.n_kv_heads=1"),
    (["parallel.tp=2", "model.ffn_dim=33"], 2, "parallel.tp=2 does not divide the MLP width 33"),
    (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not a multiple of parallel.tp x parallel.pp = 4"),
])
def test_tp_relations_fail_before_training(overrides, world, fragment):
    with pytest.raises(ConfigError) as info:
        validate(load_config(overrides), world_size=world)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cli_world_size_error_is_one_line_exit_2(tmp_path):
    """As rank 0 of a 2-process torchrun job sees it (RANK/WORLD_SIZE set): the check runs before
    any process group is made, so no peer is needed. (The head/kv/MLP checks share this path.)"""
    fragment = "world size 2 is not a multiple of parallel.tp x parallel.pp = 4"
    result = subprocess.run([sys.executable, "-m", "plait.train", "parallel.tp=4"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env=_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2"))
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
