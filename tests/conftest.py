"""Shared test settings: one torch thread, a private token cache, the gpu marker."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stdlib_tokens(tmp_path_factory):
    """(train, val) token files of the standard-library corpus, built once per test session."""
    from plait.data.corpus import prepare_corpus

    cache = os.environ.get("PLAIT_CACHE") or str(tmp_path_factory.mktemp("plait-cache"))
    return prepare_corpus(None, cache, 0.02)
