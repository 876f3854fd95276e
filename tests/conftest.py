from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama and the SmolLM2 tokenizer (loaded once per test session)."""
    from fedtune.models import load_base

    return load_base("tiny-llama")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module: faster for tiny models on a busy machine, and the same
    float reduction order as a subprocess started with OMP_NUM_THREADS=1 (results compared to 1e-6 need it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Modules whose tests start servers on fixed Flower ports (a SuperLink's other APIs keep their default ports) or
# several processes of their own: under pytest-xdist they run one after another on one worker.
SERIAL_MODULES = {"test_deploy_flower", "test_distributed", "test_flower_runtime", "test_hardening_flower"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SERIAL_MODULES:
            item.add_marker(pytest.mark.xdist_group("serial"))


def pytest_configure(config):
    # Under pytest-xdist each worker gets one intra-op thread: two workers on two cores, not four threads.
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
