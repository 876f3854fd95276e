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
TINY_COMPARE = [
    "--set", "federation.num_clients=2", "--set", "federation.clients_per_round=2", "--set", "federation.rounds=2",
    "--set", "data.demo_train_size=80", "--set", "data.demo_test_size=20", "--set", "eval.max_examples=20",
    "--set", "train.local_steps=2", "--set", "train.batch_size=4", "--set", "peft.r=4",
    "--set", "tracking.backend=tensorboard",
]


@pytest.fixture(scope="session")
def tiny_comparison(tmp_path_factory) -> Path:
    """`fedtune compare` of fedpeft and split on tiny-llama (2 clients, 2 rounds, tracked in TensorBoard): a
    comparison folder that tests read (copy it before changing it)."""
    import shlex

    from fedtune.cli import main

    out = tmp_path_factory.mktemp("tiny-comparison") / "cmp"
    argv = ["compare", str(EXAMPLES / "quickstart-tiny.yaml"), "--paradigms", "fedpeft,split", "--quiet",
            "--out", str(out), *TINY_COMPARE]
    assert main(argv) == 0, shlex.join(argv)
    return out


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1300,2200"]
"""Headless Chromium as root in a container, with nothing that reaches a network by itself."""


def _chromium_paths() -> tuple[str | None, str | None]:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _install_chromium() -> str:
    """apt-get install Debian's chromium and chromium-driver (as root); '' on success, else why not."""
    import os
    import shutil
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root on a Debian-like system"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"]
    for step in ([install], [["apt-get", "update", "-qq"], install]):
        try:
            if all(subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode == 0 for cmd in step):
                return ""
        except (OSError, subprocess.SubprocessError) as err:
            return str(err)
    return "apt-get install chromium chromium-driver failed"


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A headless Chromium driven by selenium, installed with apt-get when absent (skipped, saying why, where
    it cannot be). ``browser.get_log("browser")`` holds the page's console messages."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    chromium, driver = _chromium_paths()
    if not (chromium and driver):
        why = _install_chromium()
        chromium, driver = _chromium_paths()
        if not (chromium and driver):
            pytest.skip(f"headless Chromium is not installed and could not be installed ({why}): "
                        "apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


@pytest.fixture(scope="session")
def artefacts() -> Path:
    """Where tests leave files for a person to look at (screenshots): $FEDTUNE_TEST_ARTEFACTS or test-artefacts/."""
    import os

    path = Path(os.environ.get("FEDTUNE_TEST_ARTEFACTS", REPO / "test-artefacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
