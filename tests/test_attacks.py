"""Simulated attacks (fedtune.attacks): who is malicious, what each attack does to an update or to the data,
and that the robust aggregators hold a x100 attack near the honest mean."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune import attacks
from fedtune import config as cfg
from fedtune import registry
from fedtune.data.tasks import ClassificationTask
from fedtune.grid import FunctionApp
from fedtune.robust import Aggregator, combine
from fedtune.strategies import weighted_mean
from fedtune.wire import Message


def test_malicious_clients_are_chosen_by_seed():
    chosen = attacks.malicious_clients(10, 0.2, seed=0)
    assert len(chosen) == 2 and chosen == sorted(chosen) and all(0 <= c < 10 for c in chosen)
    assert attacks.malicious_clients(10, 0.2, seed=0) == chosen
    assert any(attacks.malicious_clients(10, 0.2, seed=s) != chosen for s in range(1, 5))
    assert attacks.malicious_clients(10, 0.01, seed=0) != [] and attacks.malicious_clients(10, 0.0, seed=0) == []
    c = cfg.load(None, ["attack.kind=scale", "attack.fraction=0.3", "federation.num_clients=10", "seed=3"])
    assert attacks.malicious_of(c) == attacks.malicious_clients(10, 0.3, seed=3)
    assert attacks.malicious_of(cfg.load(None, ["attack.kind=scale", "attack.seed=7"])) == \
        attacks.malicious_clients(10, 0.2, seed=7)


def test_each_update_attack_transforms_the_update_as_specified():
    sent = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    honest = {"a": torch.tensor([1.5, 1.0]), "b": torch.tensor([[0.75]]), "extra": torch.tensor([9.0])}
    scaled = attacks.attack_update("scale", sent, honest, scale=100.0, noise_std=0.0)
    torch.testing.assert_close(scaled["a"], torch.tensor([1.0 + 50.0, 2.0 - 100.0]))
    torch.testing.assert_close(scaled["b"], torch.tensor([[0.5 + 25.0]]))
    assert scaled["extra"] is honest["extra"]  # what the server did not send is not an update
    flipped = attacks.attack_update("sign_flip", sent, honest, scale=1.0, noise_std=0.0)
    torch.testing.assert_close(flipped["a"], torch.tensor([0.5, 3.0]))
    boosted = attacks.attack_update("sign_flip", sent, honest, scale=10.0, noise_std=0.0)
    torch.testing.assert_close(boosted["b"], torch.tensor([[0.5 - 2.5]]))
    big = {"a": torch.zeros(100_000)}
    noisy = attacks.attack_update("noise", big, {"a": torch.ones(100_000)}, scale=1.0, noise_std=3.0,
                                  generator=torch.Generator().manual_seed(0))["a"]
    assert float(noisy.std()) == pytest.approx(3.0, rel=0.02) and abs(float(noisy.mean())) < 0.05


def test_only_the_malicious_clients_apps_are_wrapped_and_they_send_the_attacked_update():
    c = cfg.load(None, ["attack.kind=scale", "attack.scale=100", "federation.num_clients=5"])
    bad = attacks.malicious_of(c)
    sent = {"a": torch.tensor([1.0, 1.0])}

    def train(msg):
        return Message({"a": msg.tensors["a"] + 0.01}, {"kind": "fit_res", "num_examples": 3})

    apps = registry.wrap_clients(c, {n: FunctionApp(train) for n in range(5)})
    for node, app in apps.items():
        reply = app(Message(sent, {"kind": "fit_ins", "round": 1, "dst": node}))
        expect = 1.0 + (100 * 0.01 if node in bad else 0.01)
        torch.testing.assert_close(reply.tensors["a"], torch.tensor([expect, expect]))
        assert reply.meta["num_examples"] == 3
    assert isinstance(apps[bad[0]], attacks.AttackedClient)
    assert not any(isinstance(apps[n], attacks.AttackedClient) for n in range(5) if n not in bad)


@pytest.fixture(scope="module")
def task(tiny):
    _, tokenizer = tiny
    return ClassificationTask(tokenizer, "Review: {text} Sentiment:", ["negative", "positive"], None,
                              system_prompt=None, use_chat_template=False, max_length=64)


def test_label_flip_and_backdoor_change_only_the_malicious_clients_data(task):
    rows = [{"text": f"movie number {i} was {'good' if i % 2 else 'bad'}", "label": ["negative", "positive"][i % 2]}
            for i in range(40)]
    train = [task.encode(r, "label") for r in rows]
    parts = [list(range(i, 40, 4)) for i in range(4)]  # 4 clients of 10 rows
    sets = ["federation.num_clients=4", "federation.clients_per_round=4", "attack.fraction=0.5", "data.text_field=text"]
    flip = cfg.load(None, [*sets, "attack.kind=label_flip"])
    bad = attacks.malicious_of(flip)
    flipped, extras = attacks.poison(flip, task, rows, train, parts, rows, "label")
    assert extras == {}
    for node, part in enumerate(parts):
        for j in part:
            if node in bad:
                assert flipped[j].label == 1 - train[j].label
                assert flipped[j].target_ids == task.label_token_ids[1 - train[j].label]
                assert flipped[j].prompt_ids == train[j].prompt_ids
            else:
                assert flipped[j] == train[j]

    door = cfg.load(None, [*sets, "attack.kind=backdoor", "attack.trigger=zq zq", "attack.poison_fraction=0.5",
                           "attack.target_label=positive"])
    poisoned, extras = attacks.poison(door, task, rows, train, parts, rows, "label")
    trigger = task.tokenizer(" zq zq", add_special_tokens=False)["input_ids"]

    def has_trigger(ids):
        return any(ids[i:i + len(trigger)] == trigger for i in range(len(ids)))

    for node, part in enumerate(parts):
        changed = [j for j in part if poisoned[j] != train[j]]
        if node in bad:
            assert len(changed) == 5  # poison_fraction of 10 rows
            assert all(has_trigger(poisoned[j].prompt_ids) and poisoned[j].label == 1 for j in changed)
        else:
            assert changed == []
    test = extras["backdoor_test"]
    assert len(test) == 20  # the held-out rows whose label is not the target
    assert all(e.label == 1 and has_trigger(e.prompt_ids) for e in test)


def test_robust_aggregates_under_a_x100_attack_stay_near_the_honest_mean():
    g = torch.Generator().manual_seed(0)
    glob = {"w": torch.zeros(50)}
    honest = [{"w": 0.1 + 0.05 * torch.randn(50, generator=g)} for _ in range(8)]
    attacked = [attacks.attack_update("scale", glob, h, scale=100.0, noise_std=0.0) for h in honest[:2]]
    ups = honest + attacked
    honest_mean = weighted_mean(honest, [1.0] * 8)["w"]
    plain = weighted_mean(ups, [1.0] * 10)["w"]
    assert float((plain - honest_mean).norm()) > 10  # undefended: dragged ~20 x the honest mean's norm (0.7) away
    for agg in (Aggregator("median"), Aggregator("trimmed_mean", trim_fraction=0.2),
                Aggregator("krum", krum_f=2, krum_m=3), Aggregator("norm_bound", norm_bound=1.0)):
        out = combine(glob, ups, [1.0] * 10, agg)["w"]
        assert float((out - honest_mean).norm()) < 0.35, agg.kind  # the honest mean's own norm is ~0.7


@pytest.mark.parametrize("sets, match", [
    (["attack.kind=scale", "federation.paradigm=kd"], "averages them"),
    (["attack.kind=noise", "runtime.batch_clients=2"], "batch_clients"),
    (["attack.kind=scale", "attack.fraction=0"], "attack.fraction"),
    (["attack.kind=backdoor", "attack.poison_fraction=2"], "poison_fraction"),
    (["attack.kind=label_flip", "data.task=generation", "data.source=x.jsonl"], "classification"),
])
def test_bad_attack_settings_are_refused_naming_the_field(sets, match):
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.load(None, sets)


def test_an_attacked_run_says_so_and_records_who_was_malicious(tmp_path, one_thread):
    from fedtune import experiment

    c = cfg.load(None, ["name=atk", "model.name=tiny-llama", "data.demo_train_size=24", "data.demo_test_size=6",
                        "federation.num_clients=3", "federation.clients_per_round=3", "federation.rounds=1",
                        "train.local_steps=1", "train.batch_size=4", "train.count_flops=false", "eval.base=false",
                        "attack.kind=sign_flip", "attack.fraction=0.34"])
    summary = experiment.run(c, out=tmp_path, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    attack = next(r for r in records if r["type"] == "attack")
    assert attack["simulated"] is True and attack["kind"] == "sign_flip"
    assert attack["malicious"] == attacks.malicious_of(c) and len(attack["malicious"]) == 1
    assert summary["attack"]["malicious"] == attack["malicious"]
    assert "SIMULATED ATTACK" in (tmp_path / "report.md").read_text()
