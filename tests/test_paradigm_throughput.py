"""Opt-in (pytest -m slow): the KD and split throughput benchmark runs on the CPU and counts its tokens right."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import paradigm_throughput

    return paradigm_throughput


def test_kd_and_split_rounds_count_every_client_token_and_compare_with_fedllm(bench):
    batch, seq = 2, 16
    tokens = bench.CLIENTS * bench.STEPS * batch * seq  # every client trains every step of round 2
    kd = bench.kd_throughput("tiny", batch, seq, device="cpu")
    assert kd["tokens"] == tokens
    assert kd["client_distill_tokens"] == bench.CLIENTS * bench.KD_DISTILL_STEPS * batch * kd["public_prompt_len"]
    assert kd["server_distill_tokens"] == bench.KD_SERVER_STEPS * batch * kd["public_prompt_len"]
    sp = bench.split_throughput("tiny", batch, seq, device="cpu")
    assert sp["tokens"] == tokens and sp["cut_layer"] == 2
    for r in (kd, sp):
        assert r["tokens_per_s"] == pytest.approx(tokens / r["round_s"])
        assert r["ratio_to_fedllm"] == pytest.approx(r["tokens_per_s"] / r["fedllm_tokens_per_s"])
        assert 0 < r["ratio_to_fedllm"] < 10
