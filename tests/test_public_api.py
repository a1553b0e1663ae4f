"""The public surface: each subpackage lists its names in `__all__`, each resolves, each is documented.

Also checks that importing a subpackage stays light (no DeepSpeed, no transformers, no
process group) and that public callables carry type hints on their parameters.
"""

import dataclasses
import importlib
import inspect
import subprocess
import sys

import re

import pytest

PACKAGES = ["plait.parallel", "plait.optim", "plait.offload", "plait.data", "plait.train", "plait.launch"]


def public_names():
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            yield package, name


def own_docstring(obj) -> str:
    """The object's own docstring; dataclasses' generated "Name(field: type, ...)" does not count."""
    doc = (obj.__doc__ or "").strip() if inspect.isclass(obj) or inspect.isroutine(obj) else ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc


@pytest.mark.parametrize("package", PACKAGES)
def test_all_lists_short_unique_resolvable_names(package):
    module = importlib.import_module(package)
    names = module.__all__
    assert names and len(names) == len(set(names)) and len(names) <= 30, names
    assert (module.__doc__ or "").strip(), f"{package} has no module docstring"
    for name in names:
        assert not name.startswith("_")
        assert getattr(module, name) is not None


@pytest.mark.parametrize("package,name", list(public_names()))
def test_every_public_name_is_documented_and_typed(package, name):
    obj = getattr(importlib.import_module(package), name)
    assert own_docstring(obj), f"{package}.{name} has no docstring"
    function = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or issubclass(obj, BaseException)):
        return  # fields are typed by the dataclass; exceptions take a message
    if not inspect.isfunction(function):
        return  # inherited C-level __init__
    params = [p for p in inspect.signature(function).parameters.values()
              if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    untyped = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not untyped, f"{package}.{name}: parameters without type hints: {untyped}"


def test_subpackage_imports_are_light():
    """One fresh interpreter imports every subpackage and touches the config names: no heavy imports."""
    code = ("import sys\n"
            f"for p in {PACKAGES!r}: __import__(p)\n"
            "import plait.train as t; t.load_config; t.ModelConfig\n"
            "import torch.distributed as dist\n"
            "heavy = [m for m in ('deepspeed', 'transformers', 'matplotlib', 'wandb', 'tensorboard') if m in sys.modules]\n"
            "print(heavy, dist.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False", out


def test_api_page_lists_exactly_the_public_names():
    """docs/api.md has one table row per public name of each subpackage, and no others."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    sections = dict(m.groups() for m in re.finditer(r"## `(plait\.\w+)`\n(.*?)(?=\n## |\Z)", text, flags=re.S))
    for package in PACKAGES:
        module = importlib.import_module(package)
        listed = re.findall(r"^\| `(\w+)` \|", sections.get(package, ""), flags=re.M)
        assert listed == list(module.__all__), (package, listed)
