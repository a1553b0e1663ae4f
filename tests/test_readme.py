"""The README's commands stay true: CI runs its test command, and its library example runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = next(line for block in _bash_blocks(readme) for line in block.splitlines() if "pytest" in line)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text()


def test_readme_library_examples_run(tmp_path, monkeypatch, stdlib_tokens):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLAIT_CACHE", str(stdlib_tokens[0].parent.parent))
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        namespace = {}
        exec(compile(block.replace('"train.steps=20"', '"train.steps=3", "train.progress=false"'),
                     "README", "exec"), namespace)
    assert namespace["loss"].item() > 0
