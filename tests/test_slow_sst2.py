"""Opt-in (pytest -m slow, or make test-slow): the real default model on real non-IID data."""

from __future__ import annotations

import json
import os

import pytest

from conftest import EXAMPLES, REPO

pytestmark = pytest.mark.slow


def test_smollm2_sst2_dirichlet_reaches_085(shared_data, tmp_path):
    import fedtune

    os.chdir(REPO)  # the example config names ../shared/data relative to the repository root
    summary = fedtune.run(EXAMPLES / "sst2-dirichlet.yaml", out=tmp_path / "run", quiet=True)
    print(json.dumps(summary, indent=2))
    assert summary["accuracy"] >= 0.85
    assert summary["accuracy"] > summary["base_accuracy"] + 0.1
