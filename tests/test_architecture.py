"""How plait is built, checked: which part may import which, where private torch names live, a plain
model, and one sentence per layout error from every entry point.

Imports are read from the source (every `import` and `from ... import`, at any depth, lazy ones
inside functions included), so a cycle cannot hide behind an import placed in a function.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("train", "parallel", "optim", "offload", "data", "launch")  # the strands and the two that use them
SHARED = ("common", "configs")  # owned by no strand
LOWER = ("parallel", "optim", "offload", "data")  # usable on their own: never import train or launch


def sources() -> Iterator[Tuple[str, Path]]:
    """(part, file) for every Python file of plait."""
    for part in PARTS + SHARED:
        for path in sorted((ROOT / part).rglob("*.py")):
            yield part, path


def plait_imports(tree: ast.AST) -> Set[str]:
    """The plait parts a file imports (static, lazy and TYPE_CHECKING imports alike)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "plait" and len(parts) > 1:
                found.add(parts[1])
    return found


def part_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {part: set() for part in PARTS + SHARED}
    for part, path in sources():
        graph[part] |= plait_imports(ast.parse(path.read_text())) - {part}
    return graph


def test_no_cycle_between_the_parts():
    graph = part_graph()
    strands = {part: graph[part] & set(PARTS) for part in PARTS}
    state: Dict[str, int] = {}

    def visit(part, trail):
        state[part] = 1
        for other in sorted(strands[part]):
            assert state.get(other) != 1, f"import cycle: {' -> '.join(trail + [part, other])}"
            if other not in state:
                visit(other, trail + [part])
        state[part] = 2

    for part in PARTS:
        if part not in state:
            visit(part, [])


def test_strands_never_import_train_or_launch_and_common_imports_no_part():
    graph = part_graph()
    for part in LOWER:
        assert not graph[part] & {"train", "launch"}, f"plait.{part} imports {graph[part] & {'train', 'launch'}}"
    assert not graph["common"] & set(PARTS + ("configs",)), f"plait.common imports {graph['common']}"
    assert not graph["launch"] & {"train"}, "plait.launch imports plait.train"


def private_torch_names(tree: ast.AST) -> Set[str]:
    """`torch._x`, `torch.a._x` (attribute chains and imports), `_foreach_*` excepted: torch's optimizers use
    them as public."""
    found = set()
    for node in ast.walk(tree):
        chain = None
        if isinstance(node, ast.Attribute):
            parts, current = [], node
            while isinstance(current, ast.Attribute):
                parts.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name) and current.id == "torch":
                chain = ["torch"] + parts[::-1]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [module] if module else [alias.name for alias in node.names]
            for name in filter(None, names):
                if name.split(".")[0] == "torch":
                    chain = name.split(".")
                    if isinstance(node, ast.ImportFrom):
                        chain = chain + [alias.name for alias in node.names]
        if chain and any(p.startswith("_") and not p.startswith(("_foreach_", "__")) for p in chain[1:]):
            found.add(".".join(chain))
    return found


def test_only_the_compatibility_module_touches_private_torch_names():
    offenders = {}
    for part, path in sources():
        names = private_torch_names(ast.parse(path.read_text()))
        if names and path != ROOT / "common" / "compat.py":
            offenders[str(path.relative_to(ROOT))] = sorted(names)
    assert not offenders, f"private torch names outside common/compat.py: {offenders}"
    assert private_torch_names(ast.parse((ROOT / "common" / "compat.py").read_text())), "the check finds nothing"


def test_the_model_is_plain():
    text = (ROOT / "train" / "model.py").read_text()
    for pattern in (r"\bgrid\b", r"\bGrid\b", r"\btp\b", r"process_group", r"ProcessGroup", r"torch\.distributed",
                    r"\bdist\."):
        assert not re.search(pattern, text), f"train/model.py mentions {pattern}"
    assert plait_imports(ast.parse(text)) <= {"train"}, "train/model.py imports another part"


def _error_line(command, cwd) -> str:
    """The one `error:` sentence a command prints (its program prefix and any world-size suffix cut)."""
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 2, (command, result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, result.stderr
    sentence = lines[0].split(": error: ", 1)[1]
    return re.sub(r" \((launch\.nodes|this \w+ run has).*\)$", "", sentence)


@pytest.mark.parametrize("overrides", [["parallel.vpp=2"], ["parallel.pp=2", "model.n_layers=3"],
                                       ["parallel.microbatches=3", "train.batch_size=16"]],
                         ids=["vpp-without-pp", "layers-over-pp", "batch-over-microbatches"])
def test_one_bad_layout_reads_the_same_from_every_entry_point(tmp_path, overrides):
    from plait.train.config import ConfigError, load_config, validate

    world = 2 if "parallel.pp=2" in overrides else 1
    with pytest.raises(ConfigError) as info:
        validate(load_config(overrides), world)
    expected = str(info.value)
    py = sys.executable
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    sentences = {
        "plait-train": _error_line([py, "-m", "plait.train", *overrides, run_dir] + (
            [] if world == 1 else ["train.dry_run=true", f"launch.world_size={world}"]), tmp_path),
        "plait-launch": _error_line([py, "-m", "plait.train.launch_cli", *overrides, "launch.dry_run=true",
                                     f"launch.procs_per_node={world}"], tmp_path),
        "plait plan": _error_line([py, "-m", "plait.train.tools", "plan", *overrides, f"launch.world_size={world}"],
                                  tmp_path),
    }
    assert set(sentences.values()) == {expected}, sentences
    assert not (tmp_path / "run").exists()


def test_the_gpu_recipe_exposes_every_package():
    """benchmarks/gpu_env.sh links each part of plait by hand (no install on the GPU image): none may be missing."""
    import tomllib

    parts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    linked = re.search(r"for part in ([a-z ]+); do", (ROOT / "benchmarks" / "gpu_env.sh").read_text()).group(1).split()
    assert sorted(linked) == sorted(parts)
