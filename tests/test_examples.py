"""The examples and the getting-started page, run exactly as the docs show them.

Every ```bash block of docs/getting-started.md and docs/examples.md is run verbatim with
bash, from a scratch directory that holds a link to examples/, with the test session's
token cache ($PLAIT_CACHE) and one thread per process. Then each block's outputs are
checked: losses fall, the checkpoint reloads into a fresh model bit for bit, offload
leaves gradients unchanged, the generated text has the requested length, the Slurm
script has the requested shape. A block the checks do not recognize fails the test, so
a new command in the docs needs a check here.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def bash_blocks(page: Path):
    return re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, stdlib_tokens):
    """(directory, environment) to run doc commands in: examples/ linked, the shared token cache."""
    directory = tmp_path_factory.mktemp("docs-run")
    (directory / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ, OMP_NUM_THREADS="1", PLAIT_CACHE=str(Path(stdlib_tokens[0]).parent.parent),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return directory, env


def run_block(block: str, scratch, timeout: int = 300) -> str:
    directory, env = scratch
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, (f"`{block.strip()}` exited {done.returncode}:\nstdout:\n{done.stdout[-3000:]}\n"
                                  f"stderr:\n{done.stderr[-6000:]}")
    return output


def losses(output: str):
    return [float(v) for v in re.findall(r"(?<![_\w])loss ([0-9.]+)", output)]


def jsonl_losses(path: Path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


# docs/getting-started.md -------------------------------------------------------------
def check_first_run(out: str, directory: Path) -> None:
    train, val = jsonl_losses(directory / "first-run" / "metrics.jsonl")
    assert len(train) == 3 and train[-1] < train[0] - 0.5, train
    assert len(val) == 2 and val[-1] < val[0], val
    assert (directory / "first-run" / "checkpoints" / "step-00000030" / "index.json").is_file()


def check_generate(out: str, directory: Path) -> None:
    assert out.startswith("def ") and "60 tokens in" in out and "from step 30" in out, out[-2000:]


def check_plan(out: str, directory: Path) -> None:
    assert "world 4 = tp 2 x dp 1 x pp 2" in out, out[-2000:]


def check_tp_pp(out: str, directory: Path) -> None:
    train, _ = jsonl_losses(directory / "tp2-pp2" / "metrics.jsonl")
    assert len(train) == 4 and train[-1] < train[0] - 0.5, train
    for rank in ("rank 0: pp 0 tp 0 dp 0", "rank 1: pp 0 tp 1 dp 0", "rank 2: pp 1 tp 0 dp 0",
                 "rank 3: pp 1 tp 1 dp 0"):
        assert rank in out, out[-3000:]


def check_slurm(out: str, directory: Path) -> None:
    assert "#SBATCH --nodes=2" in out and "--nproc-per-node=2" in out, out[-3000:]
    assert "-m plait.train parallel.tp=2 parallel.pp=2 train.steps=20" in out, out[-3000:]


def check_schedule(out: str, directory: Path) -> None:
    assert "bubble 0.1875" in out and (directory / "schedule.png").stat().st_size > 1000, out


GETTING_STARTED = [("plait-train model=tiny", check_first_run), ("plait generate", check_generate),
                   ("plait plan", check_plan),
                   ("torchrun --standalone --nproc-per-node 4", check_tp_pp),
                   ("plait-launch launch=slurm", check_slurm), ("plait schedule", check_schedule)]


def test_getting_started(scratch):
    blocks = bash_blocks(DOCS / "getting-started.md")
    assert len(blocks) == len(GETTING_STARTED), "a new command in getting-started.md needs a check here"
    for block, (marker, check) in zip(blocks, GETTING_STARTED):
        assert block.startswith(marker), (marker, block)
        check(run_block(block, scratch), scratch[0])


# docs/examples.md --------------------------------------------------------------------
def example_block(script: str) -> str:
    found = [b for b in bash_blocks(DOCS / "examples.md") if f"examples/{script}" in b]
    assert len(found) == 1, f"docs/examples.md should run examples/{script} once"
    return found[0]


def test_examples_page_runs_every_example():
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    shown = sorted(re.search(r"examples/(\w+\.py)", b).group(1) for b in bash_blocks(DOCS / "examples.md"))
    assert shown == scripts


def test_custom_loop_8_ranks(scratch):
    out = run_block(example_block("custom_loop.py"), scratch, timeout=400)
    result = json.loads((scratch[0] / "custom-loop" / "result.json").read_text())
    steps = result["losses"]
    assert len(steps) == 6 and sum(steps[-2:]) / 2 < sum(steps[:2]) / 2 - 0.1, steps
    assert losses(out)[:6] == pytest.approx(steps, abs=1e-4)
    assert result["layout"] == "world 8 = tp 2 x dp 2 x pp 2"
    assert result["differed_before_reload_rank0"] == result["params_on_rank0"] > 0
    assert result["mismatched_after_reload"] == 0
    assert result["offloaded_bytes"] > 0
    root = scratch[0] / "custom-loop" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000006" and (root / "step-00000006" / "index.json").is_file()


def test_lion_mup_plain(scratch):
    out = run_block(example_block("lion_mup_plain.py"), scratch)
    groups = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(r"group (\S+): lr (\S+) weight_decay (\S+)", out)}
    assert groups["hidden@4"] == pytest.approx((2e-3 / 4, 0.1 * 4))
    assert groups["output"] == pytest.approx((2e-3, 0.1)) and groups["input"] == pytest.approx((2e-3, 0.1))
    steps = losses(out)
    assert len(steps) == 5 and steps[-1] < steps[0] - 1.0, steps


def test_loader_offload_plain(scratch):
    out = run_block(example_block("loader_offload_plain.py"), scratch)
    assert float(re.search(r"max grad diff vs no offload (\S+)", out).group(1)) == 0.0
    assert int(re.search(r"offloaded (\d+) bytes", out).group(1)) > 0
    assert "'step': 20" in out
    assert not any((scratch[0] / "offload-scratch").rglob("*.*")), "offload left files behind"
    steps = losses(out)
    assert steps[-1] < steps[0] - 1.0, steps


def test_hf_export_and_generate(scratch):
    pytest.importorskip("transformers")
    run_block(example_block("hf_generate.py"), scratch)
    result = json.loads((scratch[0] / "hf-example" / "result.json").read_text())
    assert result["total_tokens"] == result["prompt_tokens"] + 24
    assert result["same_as_plait_greedy"] is True
    assert {p.name for p in (scratch[0] / "hf-example" / "hf").iterdir()} >= {"config.json", "model.safetensors"}


def test_docs_links_resolve():
    """Every relative link and image in docs/*.md points at a file that exists."""
    broken = []
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, broken
