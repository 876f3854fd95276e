"""`fedtune compare --tune`, `--set-for` and `compare.lr`: per-framework settings, a validation split carved
from the training rows, and tuning that never scores the test set."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import EXAMPLES
from fedtune import compare as cmp
from fedtune import config as cfg
from fedtune import experiment
from fedtune.cli import main
from fedtune.progress import Bars

QUICK = ["--set", "federation.rounds=1", "--set", "kd.public_size=8", "--set", "kd.server_steps=1",
         "--set", "kd.distill_steps=1", "--set", "train.count_flops=false", "--set", "train.local_steps=2"]


def _ids(examples) -> set[tuple[int, ...]]:
    return {tuple(e.prompt_ids) for e in examples}


# --------------------------------------------------------------------------- the validation split


def test_split_validation_is_seeded_and_partitions_the_rows():
    rows = [{"i": i} for i in range(100)]
    train, val = experiment.split_validation(rows, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(r["i"] for r in train + val) == list(range(100))
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # order kept
    assert experiment.split_validation(rows, 0.2, seed=3) == (train, val)
    assert experiment.split_validation(rows, 0.2, seed=4)[1] != val
    with pytest.raises(ValueError, match="data.validation_fraction"):
        experiment.split_validation(rows[:1], 0.5, seed=0)


@pytest.mark.parametrize("paradigm", ["fedpeft", "kd"])
def test_validation_rows_come_from_training_rows_only(tmp_path, tiny, paradigm):
    _, tok = tiny
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"text": f"ticket {i} says {'pos' if i % 2 else 'neg'}",
                                       "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(200)))
    sets = [f"data.source={src}", "data.label_words=[pos, neg]", "data.test_fraction=0.2",
            "data.validation_fraction=0.25", "federation.num_clients=3", "federation.clients_per_round=3",
            f"federation.paradigm={paradigm}", "model.name=tiny-llama", "kd.public_fraction=0.1"]
    on_test = experiment.prepare_data(cfg.load(None, sets), tok, Bars(quiet=True))
    on_val = experiment.prepare_data(cfg.load(None, sets + ["eval.split=validation"]), tok, Bars(quiet=True))
    again = experiment.prepare_data(cfg.load(None, sets + ["eval.split=validation"]), tok, Bars(quiet=True))
    assert on_test.eval_split == "test" and on_val.eval_split == "validation"
    val, test = _ids(on_val.test), _ids(on_test.test)
    assert len(on_val.test) == 40 and len(val) == 40 and val == _ids(again.test)  # 0.25 of 160, seeded
    assert not val & test  # the test set is never what a validation run scores
    assert val <= _ids(on_test.train)  # carved from the training rows ...
    client_rows = _ids(on_val.train[i] for part in on_val.parts for i in part)
    assert client_rows and not val & client_rows  # ... and held back from every client
    assert not val & _ids(on_val.public)  # nor among KD's public prompts
    assert _ids(on_val.train) | val == _ids(on_test.train)


def test_eval_split_and_compare_lr_are_validated():
    assert cfg.load(None, ["eval.split=validation"]).eval.split == "validation"
    with pytest.raises(cfg.ConfigError, match="eval.split"):
        cfg.load(None, ["eval.split=valid"])
    with pytest.raises(cfg.ConfigError, match="data.validation_fraction"):
        cfg.load(None, ["data.validation_fraction=1.0"])
    with pytest.raises(cfg.ConfigError, match="Did you mean 'kd'"):
        cfg.load(None, ["compare.lr={kdd: 0.001}"])
    with pytest.raises(cfg.ConfigError, match="compare.lr.kd"):
        cfg.load(None, ["compare.lr={kd: -1}"])


# --------------------------------------------------------------------------- per-framework settings


def test_yaml_lr_and_set_for_reach_exactly_their_framework(tmp_path):
    raw = yaml.safe_load((EXAMPLES / "quickstart-tiny.yaml").read_text())
    raw["compare"] = {"lr": {"kd": 1e-3, "centralized": 5e-2}}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(raw))
    # `fedtune run` accepts the section and trains at train.lr
    assert cfg.load(path, ["federation.paradigm=kd"]).train.lr == 0.003

    runs = {r.label: r for r in cmp.plan(str(path), [], ["fedpeft", "kd", "split"], [],
                                         set_for=cmp.parse_set_for(["split:train.lr=5e-4", "split:peft.r=4"],
                                                                   ["fedpeft", "kd", "split"]))}
    lr = {p: r.config.train.lr for p, r in runs.items()}
    assert lr == {"fedpeft": 0.003, "kd": 0.001, "split": 0.0005}
    assert {p: r.config.peft.r for p, r in runs.items()} == {"fedpeft": 8, "kd": 8, "split": 4}
    assert runs["fedpeft"].settings == {}
    assert runs["kd"].settings == {"train.lr": 0.001}
    assert runs["split"].settings == {"train.lr": 5e-4, "peft.r": 4}

    # --set-for wins over --set, --set over the YAML's compare.lr (which is then not applied at all)
    runs = cmp.plan(str(path), ["train.lr=0.01"], ["fedpeft", "kd"], [],
                    set_for={"kd": ["train.lr=2e-3"]})
    assert [(r.config.train.lr, r.settings) for r in runs] == [(0.01, {}), (2e-3, {"train.lr": 2e-3})]


def test_bad_per_framework_settings_fail_before_any_run(tmp_path):
    with pytest.raises(cfg.ConfigError, match="not among the compared"):
        cmp.parse_set_for(["kd:train.lr=1e-3"], ["fedpeft"])
    with pytest.raises(cfg.ConfigError, match="PARADIGM:section.key=value"):
        cmp.parse_set_for(["train.lr=1e-3"], ["fedpeft"])
    with pytest.raises(cfg.ConfigError, match="train.lr"):
        cmp.plan(None, [], ["kd"], [], set_for={"kd": ["train.lr=-1"]})
    with pytest.raises(cfg.ConfigError, match="both set train.lr"):
        cmp.plan(None, [], ["kd"], [], set_for={"kd": ["train.lr=1e-3"]}, tune=cmp.parse_tune("train.lr=1,2"))
    with pytest.raises(cfg.ConfigError, match="not a number"):
        cmp.parse_tune("train.optimizer=adamw,sgd")
    with pytest.raises(cfg.ConfigError, match="at least two"):
        cmp.parse_tune("train.lr=1e-3")
    with pytest.raises(cfg.ConfigError, match="--tune-rounds"):
        cmp.plan(None, [], ["kd"], [], tune_rounds=1)
    out = tmp_path / "cmp"
    # one bad candidate: the whole plan is refused before the first run
    assert main(["compare", str(EXAMPLES / "quickstart-tiny.yaml"), "--paradigms", "fedpeft",
                 "--tune", "train.lr=3e-3,-1", "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


# --------------------------------------------------------------------------- choosing


def test_choose_takes_the_best_score_and_the_smaller_value_on_ties():
    values = {"1e-3": 1e-3, "3e-3": 3e-3, "10": 10.0}
    assert cmp.choose({"1e-3": 0.5, "3e-3": 0.7, "10": 0.1}, values) == "3e-3"
    assert cmp.choose({"1e-3": 0.7, "3e-3": 0.7, "10": 0.7}, values) == "1e-3"
    assert cmp.choose({"1e-3": math.nan, "3e-3": None, "10": 0.0}, values) == "10"
    with pytest.raises(ValueError, match="every tuning run failed"):
        cmp.choose({"1e-3": None, "3e-3": math.nan}, values)


def test_tuning_plan_uses_the_validation_split_and_its_own_budget():
    runs = cmp.plan(str(EXAMPLES / "quickstart-tiny.yaml"), [], ["fedpeft", "split"],
                    cmp.parse_sweep(["peft.r=4,8"]), tune=cmp.parse_tune("train.lr=3e-3,10.0"), tune_rounds=1)
    assert len(runs) == 4 and all(len(r.candidates) == 2 for r in runs)
    for r in runs:
        for cand, lr in zip(r.candidates, (3e-3, 10.0)):
            t, f = cand.tuning, cand.final
            assert (t.eval.split, t.federation.rounds, t.train.lr, t.peft.r) == ("validation", 1, lr, r.swept["peft.r"])
            assert (f.eval.split, f.federation.rounds, f.train.lr, f.peft.r) == ("test", 2, lr, r.swept["peft.r"])
            assert t.federation.paradigm == f.federation.paradigm == r.config.federation.paradigm


def test_compare_runs_the_final_run_at_the_chosen_value(tmp_path, monkeypatch):
    """With scores we control (the real runs are in the next test): the sane lr wins for every framework."""
    import fedtune.launch

    calls = []

    def fake_run(c, out=None, quiet=False):
        calls.append((out, c))
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("")
        sane = c.train.lr < 1 if c.federation.paradigm != "kd" else c.train.lr > 1  # kd's best is the big one
        acc = (0.8 if sane else 0.2) if c.eval.split == "validation" else 0.5
        return {"paradigm": c.federation.paradigm, "rounds": c.federation.rounds, "base_accuracy": None,
                "accuracy": acc, "bytes_up": 1, "bytes_down": 1, "client_flops": None,
                "client_peak_memory_bytes": None, "wall_time_s": 0.0}

    monkeypatch.setattr(fedtune.launch, "run", fake_run)
    out = tmp_path / "cmp"
    rows = cmp.compare(str(EXAMPLES / "quickstart-tiny.yaml"), paradigms=["fedpeft", "kd"], tune="train.lr=10.0,3e-3",
                       tune_rounds=1, out=out, quiet=True)
    assert [(r["run"], r["tuned"], r["tuning"]) for r in rows] == [
        ("fedpeft", {"train.lr": 0.003}, {"10.0": 0.2, "3e-3": 0.8}),
        ("kd", {"train.lr": 10.0}, {"10.0": 0.8, "3e-3": 0.2})]
    assert [(p.relative_to(out).as_posix(), c.eval.split, c.federation.rounds, c.train.lr) for p, c in calls] == [
        ("tuning/fedpeft-10.0", "validation", 1, 10.0), ("tuning/fedpeft-3e-3", "validation", 1, 3e-3),
        ("fedpeft", "test", 2, 3e-3),
        ("tuning/kd-10.0", "validation", 1, 10.0), ("tuning/kd-3e-3", "validation", 1, 3e-3),
        ("kd", "test", 2, 10.0)]
    md = (out / "comparison.md").read_text()
    assert "| fedpeft | train.lr=0.003 |" in md and "## Tuning `train.lr`" in md
    assert "| kd | **0.800** | 0.200 | 10.0 |" in md


# --------------------------------------------------------------------------- end to end on tiny-llama


def test_tuning_comparison_on_tiny_llama_scores_only_validation_rows(tmp_path, monkeypatch, one_thread):
    """Every framework, two candidate lrs (one absurd): the recorded choice is the argmax of the recorded
    validation scores, the final run uses it, and a tuning run scores only validation rows, which are neither
    test rows nor any client's training rows."""
    runs: list[dict] = []  # one per run, in order: its prepared data and every example list it scored
    prepare, evaluate = experiment.prepare_data, experiment.evaluate

    def recording_prepare(c, tokenizer, bars):
        data = prepare(c, tokenizer, bars)
        runs.append({"split": c.eval.split, "lr": c.train.lr, "data": data, "scored": []})
        return data

    def recording_evaluate(model, task, examples, **kw):
        runs[-1]["scored"].append(list(examples))
        return evaluate(model, task, examples, **kw)

    monkeypatch.setattr(experiment, "prepare_data", recording_prepare)
    monkeypatch.setattr(experiment, "evaluate", recording_evaluate)
    out = tmp_path / "cmp"
    assert main(["compare", str(EXAMPLES / "quickstart-tiny.yaml"), "--paradigms", "fedpeft,kd,split", *QUICK,
                 "--tune", "train.lr=10.0,3e-3", "--out", str(out), "--quiet"]) == 0

    rows = json.loads((out / "comparison.json").read_text())
    assert [r["paradigm"] for r in rows] == ["fedpeft", "kd", "split"]
    for r in rows:
        scores = r["tuning"]
        assert set(scores) == {"10.0", "3e-3"}
        best = max(scores.values())
        assert r["tuned_candidate"] == min((t for t in scores if scores[t] == best), key=float)
        assert r["tuned"] == {"train.lr": float(r["tuned_candidate"])}
        for text, score in scores.items():
            run_dir = out / "tuning" / f"{r['run']}-{text}"
            assert json.loads((run_dir / "summary.json").read_text())["accuracy"] == score
            resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
            assert resolved["eval"]["split"] == "validation" and resolved["train"]["lr"] == float(text)
        final = yaml.safe_load((out / r["run"] / "config.resolved.yaml").read_text())
        assert final["eval"]["split"] == "test" and final["train"]["lr"] == r["tuned"]["train.lr"]
    md = (out / "comparison.md").read_text()
    assert "## Tuning `train.lr`" in md and all(f"| {r['run']} | train.lr=" in md for r in rows)

    # 3 frameworks x (2 tuning runs + 1 final run); the final runs' test set is the same for all
    assert [r["split"] for r in runs] == ["validation", "validation", "test"] * 3
    assert [r["lr"] for r in runs if r["split"] == "validation"] == [10.0, 3e-3] * 3
    test_set = _ids(runs[2]["data"].test)
    assert all(_ids(r["data"].test) == test_set for r in runs if r["split"] == "test")
    for r in runs:
        scored = _ids(e for batch in r["scored"] for e in batch)
        assert scored and scored <= _ids(r["data"].test)
        if r["split"] == "validation":
            clients = _ids(r["data"].train[i] for part in r["data"].parts for i in part)
            assert not scored & test_set and not scored & clients
            assert len(r["scored"]) == 1  # no base model, only the last round: one scoring per tuning run
