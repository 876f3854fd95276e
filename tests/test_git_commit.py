"""experiment.git_commit: fedtune's own commit, never that of whatever repository encloses an installed copy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fedtune import experiment

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _repo(root: Path, name: str, package: str) -> str:
    """A git repository at `root` with a pyproject naming `name` and a fedtune package at `package`; its HEAD."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(f'[project]\nname = "{name}"\nversion = "0"\n')
    run = lambda *a: subprocess.run(["git", *a], cwd=root, check=True, capture_output=True, text=True).stdout
    run("init", "-q")
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    return run("rev-parse", "HEAD").strip()


def test_a_fedtune_checkout_reports_its_commit(tmp_path):
    head = _repo(tmp_path / "fedtune", "fedtune", "src/fedtune")
    assert experiment.git_commit(tmp_path / "fedtune" / "src" / "fedtune") == head


def test_an_installed_copy_inside_another_repository_reports_none(tmp_path):
    _repo(tmp_path / "other", "other-project", "lib/site-packages/fedtune")
    assert experiment.git_commit(tmp_path / "other" / "lib" / "site-packages" / "fedtune") is None
    # even at src/fedtune of a repository whose project is not fedtune
    _repo(tmp_path / "other2", "not-fedtune", "src/fedtune")
    assert experiment.git_commit(tmp_path / "other2" / "src" / "fedtune") is None


def test_a_wheel_in_a_fedtune_checkouts_venv_reports_none(tmp_path):
    _repo(tmp_path / "fedtune", "fedtune", "src/fedtune")
    venv_copy = tmp_path / "fedtune" / ".venv" / "lib" / "site-packages" / "fedtune"
    venv_copy.mkdir(parents=True)
    assert experiment.git_commit(venv_copy) is None


def test_outside_any_repository_reports_none(tmp_path):
    (tmp_path / "fedtune").mkdir()
    assert experiment.git_commit(tmp_path / "fedtune") is None


def test_this_checkout_reports_its_own_head():
    package = Path(experiment.__file__).parent
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=package, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()) / "src" / "fedtune" != package.resolve():
        pytest.skip("fedtune is not run from a git checkout here")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True).stdout.strip()
    assert experiment.git_commit() == head
