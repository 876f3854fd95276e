"""report.summarize and the run's report.md: FLOPs not counted, first-round vs steady peak memory, base accuracy."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES
from fedtune.cli import main
from fedtune.report import WARM_UP_NOTE, summarize, summary_rows

MIB = 2**20
CONFIG = {"name": "t", "federation": {"paradigm": "fedpeft", "strategy": "fedavg", "rounds": 3, "num_clients": 2,
                                      "clients_per_round": 2},
          "data": {"task": "classification", "metric": None}, "model": {"name": "tiny-llama"},
          "train": {"count_flops": True}}


def client(rnd: int, node: int, peak_mib: int, flops: int | None = 10**9, status: str = "ok") -> dict:
    return {"type": "client", "round": rnd, "client": node, "status": status, "bytes_up": 1, "bytes_down": 1,
            "flops": flops, "peak_memory_bytes": peak_mib * MIB, "seconds": 0.5}


def rows(s: dict) -> dict[str, str]:
    return dict(summary_rows(s))


def test_peak_memory_is_split_into_the_first_round_and_the_steady_state():
    # a CUDA-like first round: the first client of the process warms up (5.6 GiB), the rest run at ~562 MiB
    records = [client(1, 0, 5734), client(1, 1, 560), client(2, 0, 562), client(2, 1, 561), client(3, 0, 550),
               client(3, 1, 9999, status="failed")]  # a failed record measures nothing
    s = summarize(records, CONFIG, 0.5, 1.0)
    assert s["client_peak_memory_bytes"] == 562 * MIB
    assert s["client_peak_memory_first_bytes"] == 5734 * MIB
    assert rows(s)["client peak memory"] == "562 MiB" and rows(s)["client peak memory, first round"] == "5734 MiB"


def test_peak_memory_of_a_one_round_run_and_of_a_resumed_one():
    s = summarize([client(1, 0, 700), client(1, 1, 300)], CONFIG, None, 1.0)
    assert s["client_peak_memory_bytes"] is None and s["client_peak_memory_first_bytes"] == 700 * MIB
    assert rows(s)["client peak memory"].startswith("- (one round")
    # the first round is the first one with successful client records (round 1's clients all failed here)
    s = summarize([client(1, 0, 900, status="failed"), client(2, 0, 800), client(3, 0, 400)], CONFIG, None, 1.0)
    assert (s["client_peak_memory_first_bytes"], s["client_peak_memory_bytes"]) == (800 * MIB, 400 * MIB)
    s = summarize([client(1, 0, 900, status="failed")], CONFIG, None, 1.0)
    assert s["client_peak_memory_bytes"] is None and s["client_peak_memory_first_bytes"] is None


def test_flops_not_counted_are_null_and_read_not_counted():
    records = [client(1, 0, 1, flops=None), client(1, 1, 1, flops=None), {"type": "server", "round": 1,
                                                                          "flops": None, "seconds": 0.1}]
    s = summarize(records, CONFIG, None, 1.0)
    assert s["client_flops"] is None and s["server_flops"] is None
    assert rows(s)["client GFLOPs (total)"] == "not counted" == rows(s)["server GFLOPs (total)"]
    # train.count_flops false: not counted even where no record says so (fedpeft logs no server records)
    s = summarize([client(1, 0, 1, flops=None)], {**CONFIG, "train": {"count_flops": False}}, None, 1.0)
    assert s["client_flops"] is None and s["server_flops"] is None
    # counted: sums, and a server that logs nothing did 0 FLOPs
    s = summarize([client(1, 0, 1, flops=2 * 10**9), client(1, 1, 1, flops=3 * 10**9)], CONFIG, None, 1.0)
    assert (s["client_flops"], s["server_flops"]) == (5 * 10**9, 0)
    assert rows(s)["client GFLOPs (total)"] == "5.0" and rows(s)["server GFLOPs (total)"] == "0.0"


@pytest.fixture(scope="module")
def uncounted_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    code = main(["compare", str(EXAMPLES / "quickstart-tiny.yaml"), "--paradigms", "fedpeft,centralized",
                 "--set", "federation.rounds=2", "--set", "train.local_steps=1", "--set", "train.count_flops=false",
                 "--set", "eval.max_examples=8", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_a_run_without_flop_counting_reports_not_counted(uncounted_compare):
    out = uncounted_compare
    for run in ("fedpeft", "centralized"):
        s = json.loads((out / run / "summary.json").read_text())
        assert s["client_flops"] is None and s["server_flops"] is None, run
        report = (out / run / "report.md").read_text()
        assert "| client GFLOPs (total) | not counted |" in report and "| 0.0 |" not in report
        assert WARM_UP_NOTE in report
        assert s["client_peak_memory_bytes"] > 0 and s["client_peak_memory_first_bytes"] > 0
    rows_ = json.loads((out / "comparison.json").read_text())
    assert all(r["client_gflops_per_round"] is None and r["client_flops"] is None for r in rows_)
    table = (out / "comparison.md").read_text()
    assert all(line.count("not counted") == 2 for line in table.splitlines() if line.startswith("| fedpeft |")
               or line.startswith("| centralized |"))


def test_a_run_that_reuses_the_comparisons_base_score_reports_it(uncounted_compare):
    # centralized runs second: the base model was scored in the fedpeft run and not again
    out = uncounted_compare
    first, second = (json.loads((out / r / "summary.json").read_text()) for r in ("fedpeft", "centralized"))
    assert second["base_accuracy"] == first["base_accuracy"] is not None
    assert second["base_accuracy_from"] == "fedpeft" and "base_accuracy_from" not in first
    report = (out / "centralized" / "report.md").read_text()
    assert f"| base accuracy | {first['base_accuracy']:.3f} (scored once for the comparison, in run `fedpeft`) |" \
        in report
    assert "| base accuracy | - |" not in report
