"""Packaging: the wheel builds, holds the example configs and the advisor's table, and an installed copy (not
editable) runs `fedtune` with its examples reachable; `python -m fedtune` is the same command line."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import zipfile

import pytest

from conftest import EXAMPLES, REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("fedtune-*.whl")
    return whl


def test_the_wheel_holds_the_package_data(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for example in EXAMPLES.glob("*.yaml"):
            assert z.read(f"fedtune/examples/{example.name}") == example.read_bytes()
        assert "fedtune/resources/advise_demo.json" in names and "fedtune/__main__.py" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "fedtune = fedtune.cli:main" in z.read(entry_points).decode()


def test_an_installed_wheel_runs_with_its_examples(wheel, tmp_path):
    """`pip install` of the wheel (into a folder, so the environment's own fedtune is left alone): its `fedtune`
    script copies an example out of the installed package, not out of this checkout."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONWARNINGS="ignore")
    script = site / "bin" / "fedtune"
    work = tmp_path / "work"
    work.mkdir()
    # fedtune.examples_cli is what `fedtune examples` runs, without the command line's import of torch
    probe = ("import fedtune; from fedtune.examples_cli import copy; print(fedtune.__file__); "
             "copy(['quickstart-tiny'], 'mine')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(site))  # the installed copy, not src/
    assert (work / "mine" / "quickstart-tiny.yaml").read_bytes() == (EXAMPLES / "quickstart-tiny.yaml").read_bytes()
    assert script.is_file() and "fedtune.cli" in script.read_text()


def test_python_dash_m_fedtune(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fedtune", "examples"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("fedtune", run_name="__main__")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "quickstart-tiny\n    fedtune run examples/quickstart-tiny.yaml" in out and "demo\n" in out


def test_examples_copy_refuses_to_overwrite(tmp_path, capsys):
    from fedtune.cli import main

    assert main(["examples", "--copy-to", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in EXAMPLES.glob("*.yaml")}
    assert main(["examples", "--copy-to", str(tmp_path), "demo"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["examples", "--copy-to", str(tmp_path), "--force", "demo"]) == 0
    assert main(["examples", "--copy-to", str(tmp_path), "nope"]) == 2
    assert "no example named 'nope'" in capsys.readouterr().err
