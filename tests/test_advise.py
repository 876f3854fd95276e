"""`fedtune advise` on hand-made comparison tables: who fits which constraints, the order, and the reasons."""

from __future__ import annotations

import json

import pytest

from fedtune.advise import Constraints, bundled, from_comparison, human, parse_size, rank
from fedtune.cli import main

MB = 1e6
TABLE = [  # made up, so that each constraint excludes a different framework
    {"run": "fedpeft", "paradigm": "fedpeft", "access": "white", "accuracy": 0.60, "base_accuracy": 0.20,
     "up_bytes_per_client_round": 4 * MB, "client_memory_bytes": 1500 * 2**20},
    {"run": "kd", "paradigm": "kd", "access": "white", "accuracy": 0.70, "base_accuracy": 0.20,
     "up_bytes_per_client_round": 4 * MB, "client_memory_bytes": 1800 * 2**20},
    {"run": "split", "paradigm": "split", "access": "white", "accuracy": 0.65, "base_accuracy": 0.20,
     "up_bytes_per_client_round": 5 * MB, "client_memory_bytes": 1200 * 2**20},
    {"run": "offsite", "paradigm": "offsite", "access": "gray", "accuracy": 0.30, "base_accuracy": 0.20,
     "up_bytes_per_client_round": 0.5 * MB, "client_memory_bytes": 250 * 2**20},
    {"run": "fedbpt", "paradigm": "fedbpt", "access": "black", "accuracy": 0.25, "base_accuracy": 0.20,
     "up_bytes_per_client_round": 0.4 * MB, "client_memory_bytes": 0},
    {"run": "centralized", "paradigm": "centralized", "access": "white", "accuracy": 0.9, "base_accuracy": 0.2,
     "up_bytes_per_client_round": 0, "client_memory_bytes": 0},
]


def names(verdicts):
    return [v.row["run"] for v in verdicts]


def test_no_constraint_ranks_by_gain_and_never_offers_centralized():
    fit, excluded = rank(TABLE, Constraints())
    assert names(fit) == ["kd", "split", "fedpeft", "offsite", "fedbpt"] and excluded == []


def test_each_constraint_excludes_with_the_number():
    fit, excluded = rank(TABLE, Constraints(client_memory=parse_size("1.5GiB", "--client-memory")))
    assert names(excluded) == ["kd"]
    assert excluded[0].fails == ["a client needs 1.76 GiB, over the 1.50 GiB available"]
    fit, excluded = rank(TABLE, Constraints(uplink=parse_size("4MB", "--uplink")))
    assert names(excluded) == ["split"] and "sends 5.00 MB up per client-round, over the 4.00 MB" in excluded[0].fails[0]
    fit, excluded = rank(TABLE, Constraints(server_every_step=False))
    assert names(excluded) == ["split", "fedbpt"] and all("every step" in v.fails[0] for v in excluded)
    fit, excluded = rank(TABLE, Constraints(access="gray"))
    assert names(fit) == ["offsite", "fedbpt"]
    assert excluded[0].fails == ["needs white-box access; clients may see at most gray-box"]
    fit, _ = rank(TABLE, Constraints(access="black"))
    assert names(fit) == ["fedbpt"]


def test_a_privacy_budget_keeps_update_dp_frameworks_and_checks_measured_epsilon():
    fit, excluded = rank(TABLE, Constraints(epsilon=8))
    assert names(fit) == ["fedpeft", "offsite"]
    assert "measured without DP noise" in fit[0].reasons[-1]
    assert "activations and labels leave the client" in next(v for v in excluded if v.row["run"] == "split").fails[0]
    noisy = [{**TABLE[0], "run": "fedpeft-eps4", "epsilon": 4.0}, {**TABLE[0], "run": "fedpeft-eps16", "epsilon": 16.0}]
    fit, excluded = rank(noisy, Constraints(epsilon=8))
    assert names(fit) == ["fedpeft-eps4"] and "measured at epsilon 16, over the budget 8" in excluded[0].fails


def test_constraints_together():
    fit, excluded = rank(TABLE, Constraints(client_memory=1.6 * 2**30, uplink=4.5 * MB, server_every_step=False))
    assert names(fit) == ["fedpeft", "offsite"]
    assert {v.row["run"]: len(v.fails) for v in excluded} == {"kd": 1, "split": 2, "fedbpt": 1}


def test_ties_go_to_fewer_bytes_and_a_loss_is_said():
    rows = [{**TABLE[0], "run": "a", "up_bytes_per_client_round": 9.0},
            {**TABLE[0], "run": "b", "up_bytes_per_client_round": 3.0},
            {**TABLE[0], "run": "c", "accuracy": 0.1}]
    fit, _ = rank(rows, Constraints())
    assert names(fit) == ["b", "a", "c"] and "did not improve on the base model" in fit[-1].reasons[-1]


def test_sizes():
    assert parse_size("2GiB", "x") == 2 * 2**30 and parse_size("500 KB", "x") == 5e5 and parse_size("4096", "x") == 4096
    assert parse_size("1.5e6", "x") == 1.5e6
    with pytest.raises(ValueError, match="--uplink '3 parsecs' is not a size"):
        parse_size("3 parsecs", "--uplink")
    assert human(584) == "584 B" and human(3.72e6) == "3.72 MB" and human(1490 * 2**20, True) == "1.46 GiB"
    with pytest.raises(ValueError, match="--access 'grey'"):
        Constraints(access="grey")


def test_the_bundled_table_matches_the_docs():
    """Each bundled row is the measured one of docs/results.md or docs/paradigms-beyond-backprop.md."""
    from conftest import REPO

    task, rows = bundled()
    by = {r["paradigm"]: r for r in rows}
    results = (REPO / "docs" / "results.md").read_text()
    assert "| fedpeft | 0.220 | 0.570 | - | 33.46 | 33.46 | 1683 | 1490 |" in results
    assert by["fedpeft"]["accuracy"] == 0.570 and by["fedpeft"]["client_memory_bytes"] == 1490 * 2**20
    assert by["fedpeft"]["up_bytes_per_client_round"] == pytest.approx(33.46e6 / 9, rel=1e-3)  # 3 rounds x 3 clients
    assert "| split | 0.220 | 0.600 | - | 42.88 | 42.81 | 836 | 1250 |" in results
    assert by["split"]["up_bytes_per_client_round"] == pytest.approx(42.88e6 / 9, rel=1e-3)
    assert by["split"]["client_gflops_per_client_round"] == pytest.approx(836 / 3, abs=1)
    beyond = (REPO / "docs" / "paradigms-beyond-backprop.md").read_text()
    assert "| fedkseed | white | no | 0.26, 0.26, 0.25 | 584 B (10 pairs)" in beyond
    assert by["fedkseed"]["up_bytes_per_client_round"] == 584 and by["fedkseed"]["accuracy"] == 0.25
    assert {r["paradigm"] for r in rows} == {"fedpeft", "kd", "split", "fedkseed", "offsite", "fedbpt"}


def test_from_a_comparison_folder(tmp_path, capsys):
    (tmp_path / "fedpeft").mkdir()
    (tmp_path / "comparison.json").write_text(json.dumps([
        {"run": "fedpeft", "paradigm": "fedpeft", "access": "white", "backprop": True, "accuracy": 0.5,
         "base_accuracy": 0.25, "bytes_up": 6000, "bytes_down": 6000, "client_gflops_per_round": 3.0,
         "client_peak_memory_bytes": 2**20, "client_peak_memory_first_bytes": 2 * 2**20}]))
    (tmp_path / "fedpeft" / "summary.json").write_text(json.dumps({"client_rounds": 6, "clients_per_round": 3}))
    (row,) = from_comparison(tmp_path)
    assert row["up_bytes_per_client_round"] == 1000 and row["client_memory_bytes"] == 2**20
    assert row["client_gflops_per_client_round"] == 1.0
    assert main(["advise", "--from", str(tmp_path), "--uplink", "2KB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in out["fit"]] == ["fedpeft"] and "sends 1.00 KB up per client-round (<= 2.00 KB)" in \
        out["fit"][0]["reasons"]
    assert main(["advise", "--client-memory", "1.5GiB", "--server", "per-round"]) == 0
    text = capsys.readouterr().out
    assert "| 1 | fedpeft | white | 0.570 (0.220) | 3.72 MB | 1.46 GiB | 561 |" in text
    assert "- **kd (hybrid)**: a client needs 1.74 GiB" in text
    assert main(["advise", "--from", str(tmp_path / "nothing")]) == 2
