"""Every GPU check of plait in one command, on one GPU, in about nine minutes: one JSON, one table.

Runs, each in its own process with its own time limit (a step that fails or runs out is
recorded and the rest go on):

1. `pytest -m gpu`: every CUDA path's test (pass / fail / skip counts);
2. the 1B training step against Hugging Face's LlamaForCausalLM, eager and compiled, bf16
   (benchmarks/step_throughput.py --preset 1b), with MFU against the datasheet peak; then plait's with
   float8 GEMMs (`train.precision=fp8`) against the same HF step in bf16 (step_fp8);
3. `plait-train model=1b` on CUDA, bf16, `train.compile=auto`: tokens/s and MFU as logged;
4. one optimizer step over the 1B shapes: plait Lion (Triton) against lion-pytorch (its
   Triton kernel where installed), torch's fused AdamW and Lion's byte floor (optim_step.py);
5. one Muon step over a 1B-like stack (dim 2048, 16 layers): plait's against torch.optim.Muon
   plus fused AdamW (muon.py); a mixture-of-experts block (8 experts, top-2, dim 2048, 8192 tokens)
   against transformers' Mixtral block (moe.py); then the loader: GPU gather from registered host memory
   against DataLoader (loader.py);
6. activation offload at two sizes (offload.py): keep, host, file, auto, recompute and
   torch's save_on_cpu, with the adaptive plan's bound and the disk's own bandwidth;
7. how long a checkpoint stops the 1B training (checkpoint.py --part stall): plait's
   background save against its synchronous one and DCP's async_save, in step times.

The table sets each headline figure beside the first GPU run's (2026-12-04, H200, the code
at fe40faa), where there is one. `--smoke` shrinks every size so the harness itself can be
checked on a CPU in a minute (its numbers mean nothing).

    python benchmarks/gpu_suite.py --out gpu_suite.json
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite.json      # the harness, on CPU

On a GPU machine with no package index, see docs/gpu.md for the wheels to bring.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

# the first GPU run (shared/notes/gpu.md): what each headline figure was before this suite
BEFORE = {
    "step.eager_tokens_per_s": 52_839, "step.compiled_tokens_per_s": 67_512, "step.hf_tokens_per_s": 47_226,
    "train.mfu": 0.54, "train.tokens_per_s": 65_000,
    "optim.plait_lion_ms": 11.12, "optim.lion_pytorch_triton_ms": 6.83, "optim.adamw_fused_ms": 11.07,
    "optim.lion_floor_ms": 5.75,
    "offload_small.offload-host_time_vs_keep": 1.23, "offload_large.offload-host_time_vs_keep": 1.00,
    "checkpoint.sync_save_s": 31.2, "checkpoint.async_stall_steps": 102,  # issue 19: save_checkpoint() on the 1B
}


def run_step(name: str, command: List[str], limit_s: float, log_dir: Path) -> Dict:
    """Run one step's command; returns its status, wall time and output tail (the log is kept whole)."""
    start = time.perf_counter()
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log:
        try:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timeout {limit_s:.0f}s"
    wall = time.perf_counter() - start
    tail = log_path.read_text(errors="replace")[-1500:]
    print(f"[{name}] {status} in {wall:.0f}s", flush=True)
    if status != "ok":
        print(tail, flush=True)
    return {"name": name, "status": status, "wall_s": round(wall, 1), "tail": tail}


def read_json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_counts(xml_path: Path) -> Dict[str, int]:
    """passed / failed / skipped / errors from pytest's JUnit XML, and the failing tests' names."""
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failures": []}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def train_figures(run_dir: Path, last: int = 5) -> Dict[str, float]:
    """Median tokens/s and MFU of the last logged steps of a plait-train run (the first ones compile)."""
    records = []
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "tokens_per_s" in record:
                records.append(record)
    except OSError:
        return {}
    records = records[-last:]
    if not records:
        return {}
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records), "steps": len(records)}


def plan(args, out: Path) -> List[tuple]:
    """(name, command, time limit, result file) for every step, sized by --smoke."""
    py = sys.executable
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    step_shape = (["--dim", "128", "--layers", "2", "--heads", "4", "--ffn", "352", "--seq", "64", "--batch", "2"]
                  if smoke else ["--preset", "1b", "--seq", "2048", "--batch", "8"])
    train_shape = (["model=tiny", "train.seq_len=64", "train.batch_size=4", "train.steps=6"] if smoke else
                   ["model=1b", "train.seq_len=2048", "train.batch_size=8", "train.steps=14"])
    small = ["--layers", "8", "--dim", "1024", "--seq", "1024", "--micro", "2", "--batch", "4"]
    large = ["--layers", "4", "--dim", "2048", "--seq", "2048", "--micro", "2", "--batch", "2"]
    if smoke:
        small = large = ["--layers", "4", "--dim", "64", "--seq", "64", "--micro", "2", "--batch", "2"]
    steps = [
        ("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}",
                   "tests"] + (["-k", "peaks"] if smoke else []), 150, out / "tests.xml"),
        ("step", [py, str(BENCH / "step_throughput.py"), "--device", device, "--precisions", "bf16", "--rounds",
                  "2" if smoke else "5", "--warmup", "1" if smoke else "2", "--out", str(out / "step.json")]
         + step_shape, 150, out / "step.json"),
        ("step_fp8", [py, str(BENCH / "step_throughput.py"), "--device", device, "--precisions", "fp8", "--rounds",
                      "2" if smoke else "4", "--warmup", "1" if smoke else "2", "--out", str(out / "step_fp8.json")]
         + step_shape, 150, out / "step_fp8.json"),
        ("train", [py, "-m", "plait.train", *train_shape, f"train.device={device}", "train.precision=bf16",
                   "train.eval_every=0", "train.log_every=1", "train.progress=false", "checkpoint.save_final=false",
                   f"train.run_dir={out / 'train'}"], 120, out / "train"),
        ("optim", [py, str(BENCH / "optim_step.py"), "--device", device, "--rounds", "10"]
         + (["--params", "2e6"] if smoke else ["--shapes", "1b"]) + ["--out", str(out / "optim.json")], 60,
         out / "optim.json"),
        ("muon", [py, str(BENCH / "muon.py"), "--device", device, "--steps", "0", "--rounds", "5"]
         + (["--dim", "128", "--layers", "2"] if smoke else ["--dim", "2048", "--layers", "16"])
         + ["--out", str(out / "muon.json")], 90, out / "muon.json"),
        ("moe", [py, str(BENCH / "moe.py"), "--device", device, "--steps", "0", "--rounds", "5"]
         + (["--dim", "128", "--ffn", "256", "--tokens", "256"] if smoke else
            ["--dim", "2048", "--ffn", "5632", "--tokens", "8192"])
         + ["--out", str(out / "moe.json")], 90, out / "moe.json"),
        ("loader", [py, str(BENCH / "loader.py"), "--tokens", "2000000" if smoke else "20000000", "--rounds", "2",
                    "--batches", "50", "--out", str(out / "loader.json")], 60, out / "loader.json"),
        ("offload_small", [py, str(BENCH / "offload.py"), "--device", device, "--rounds", "3", *small,
                           "--out", str(out / "offload_small.json")], 60, out / "offload_small.json"),
        ("offload_large", [py, str(BENCH / "offload.py"), "--device", device, "--rounds", "3", *large,
                           "--out", str(out / "offload_large.json")], 60, out / "offload_large.json"),
        ("checkpoint", [py, str(BENCH / "checkpoint.py"), "--part", "stall", "--device", device, "--rounds", "2"]
         + (["--stall-dim", "64", "--stall-layers", "2"] if smoke else ["--stall-preset", "1b"])
         + ["--out", str(out / "checkpoint.json")], 240, out / "checkpoint.json"),
    ]
    return [step for step in steps if step[0] in args.only] if args.only else steps


def headline(name: str, result: Dict) -> Dict[str, float]:
    """The figures of one step that go in the table (and in BEFORE)."""
    if result is None:
        return {}
    if name == "tests":
        return {key: value for key, value in result.items() if key != "failures"}
    if name == "train":
        return result
    summary = result.get("summary", {})
    if name in ("step", "step_fp8"):
        rows = {row["contender"]: row for row in result.get("rows", [])}
        figures = {f"{key}_tokens_per_s": rows[contender]["tokens_per_s"] for key, contender in
                   (("eager", "plait eager"), ("compiled", "plait compiled"), ("hf", "hf LlamaForCausalLM"))
                   if contender in rows}
        figures.update({f"{key}_mfu": rows[contender]["mfu"] for key, contender in
                        (("eager", "plait eager"), ("compiled", "plait compiled"), ("hf", "hf LlamaForCausalLM"))
                        if contender in rows})
        return figures
    if name == "optim":
        rows = {row["name"]: row for row in result.get("rows", [])}
        figures = {"plait_lion_ms": summary.get("plait_lion_ms"), "plait_lion_impl": summary.get("plait_lion_impl"),
                   "lion_floor_ms": summary.get("lion_floor_ms"), "plait_vs_floor": summary.get("plait_vs_floor"),
                   "adamw_fused_ms": rows.get("AdamW fused", {}).get("median_ms")}
        if "lion-pytorch (triton)" in rows:
            figures["lion_pytorch_triton_ms"] = rows["lion-pytorch (triton)"]["median_ms"]
        return {key: value for key, value in figures.items() if value is not None}
    return {key: value for key, value in summary.items() if isinstance(value, (int, float))}


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_suite.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the harness only")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps")
    args = parser.parse_args(argv)
    out_path = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="plait-gpu-suite-"))
    import torch

    device = "cpu (smoke)" if args.smoke else (torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; run it on a GPU machine, or --smoke to check the harness.")
        return {}
    print(f"gpu_suite on {device}, torch {torch.__version__}, work dir {work}", flush=True)
    rows, figures = [], {}
    for name, command, limit, result_path in plan(args, work):
        row = run_step(name, command, limit, work)
        if name == "tests":
            result = pytest_counts(result_path)
        elif name == "train":
            result = train_figures(result_path)
        else:
            result = read_json(result_path)
        row["figures"] = headline(name, result)
        row["result"] = result if name != "tests" else row["figures"]
        rows.append(row)
        figures.update({f"{name}.{key}": value for key, value in row["figures"].items()})
    print(f"\n{'figure':<48} {'now':>14} {'first GPU run':>14}")
    for key, value in figures.items():
        before = BEFORE.get(key)
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<48} {shown:>14} {'' if before is None else f'{before:,}':>14}")
    print("\n" + "  ".join(f"{row['name']}: {row['status']} ({row['wall_s']}s)" for row in rows))
    result = {"benchmark": "gpu_suite", "device": device, "torch": torch.__version__, "rows": rows,
              "summary": figures, "before": BEFORE}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
