"""FedYogi, FedAdagrad and SCAFFOLD against hand computations of their update rules (Reddi et al. 2021,
Karimireddy et al. 2020), and SCAFFOLD end to end: gradient correction, payload, checkpoint and resume."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune import config as cfg
from fedtune import scaffold
from fedtune.strategies import CONTROL, FedAdagrad, FedYogi, Scaffold, make_strategy
from fedtune.train.local_steps import TrainSettings, clip_and_step, make_optimizer

# Two clients of 1 and 3 examples, two coordinates; global w = (1, -2).
W = {"w": torch.tensor([1.0, -2.0])}
ROUND1 = [({"w": torch.tensor([3.0, -2.0])}, 1.0), ({"w": torch.tensor([1.0, -4.0])}, 3.0)]
# mean = (1.5, -3.5): pseudo-gradient g1 = (0.5, -1.5)
ROUND2 = [({"w": torch.tensor([0.0, 0.0])}, 1.0)]


def test_fedyogi_two_rounds_by_hand():
    s = FedYogi(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w1 = s.aggregate(W, ROUND1)
    g1 = [0.5, -1.5]
    m1 = [0.1 * g for g in g1]
    v1 = [0 - 0.01 * g * g * math.copysign(1, 0 - g * g) for g in g1]  # sign(0 - g^2) = -1: v = 0.01 g^2
    want1 = [w + 0.1 * m / (math.sqrt(v) + 1e-3) for w, m, v in zip([1.0, -2.0], m1, v1)]
    torch.testing.assert_close(w1["w"], torch.tensor(want1))
    # Round 2 from w1, one client at 0: g2 = -w1. Yogi's v moves by (1 - beta2) g^2 towards g^2.
    w2 = s.aggregate(w1, ROUND2)
    g2 = [-x for x in want1]
    m2 = [0.9 * m + 0.1 * g for m, g in zip(m1, g2)]
    v2 = [v - 0.01 * g * g * math.copysign(1, v - g * g) for v, g in zip(v1, g2)]
    want2 = [w + 0.1 * m / (math.sqrt(v) + 1e-3) for w, m, v in zip(want1, m2, v2)]
    torch.testing.assert_close(w2["w"], torch.tensor(want2))
    # Unlike Adam's, Yogi's v did not decay by beta2: it grew by exactly (1 - beta2) g^2 (g^2 > v here).
    assert all(v2[i] == pytest.approx(v1[i] + 0.01 * g2[i] ** 2) for i in range(2))


def test_fedadagrad_two_rounds_by_hand():
    s = FedAdagrad(server_lr=0.1, beta1=0.5, tau=1e-9)
    w1 = s.aggregate(W, ROUND1)
    g1 = [0.5, -1.5]
    m1 = [0.5 * g for g in g1]
    v1 = [g * g for g in g1]
    want1 = [w + 0.1 * m / (math.sqrt(v) + 1e-9) for w, m, v in zip([1.0, -2.0], m1, v1)]
    torch.testing.assert_close(w1["w"], torch.tensor(want1))
    w2 = s.aggregate(w1, ROUND2)
    g2 = [-x for x in want1]
    m2 = [0.5 * m + 0.5 * g for m, g in zip(m1, g2)]
    v2 = [v + g * g for v, g in zip(v1, g2)]  # the sum of squares: never decays
    want2 = [w + 0.1 * m / (math.sqrt(v) + 1e-9) for w, m, v in zip(want1, m2, v2)]
    torch.testing.assert_close(w2["w"], torch.tensor(want2))


def test_adaptive_state_round_trips_and_make_strategy_builds_each():
    for name in ("fedyogi", "fedadagrad"):
        one, two = make_strategy(name, 0.05, 0.9), make_strategy(name, 0.05, 0.9)
        one.aggregate(W, ROUND1)
        two.load_state_dict(one.state_dict())
        torch.testing.assert_close(one.aggregate(W, ROUND2), two.aggregate(W, ROUND2))
    assert make_strategy("fedyogi", None, 0.9).server_lr == FedYogi.DEFAULT_SERVER_LR
    assert make_strategy("scaffold", None, 0.9, num_clients=4).num_clients == 4
    with pytest.raises(ValueError, match="scaffold.*fedpeft or fedprox"):
        make_strategy("scaffold", None, 0.9)


def test_scaffold_server_round_by_hand():
    s = Scaffold(server_lr=0.5, num_clients=4)
    sent = s.payload(W)
    assert set(sent) == {"w", CONTROL + "w"} and torch.equal(sent[CONTROL + "w"], torch.zeros(2))
    ups = [({"w": y["w"], CONTROL + "w": torch.tensor([1.0, 2.0])}, n) for (y, n) in ROUND1[:1]]
    ups.append(({"w": ROUND1[1][0]["w"], CONTROL + "w": torch.tensor([-3.0, 6.0])}, 3.0))
    new = s.aggregate(W, ups)
    # x += 0.5 * (weighted mean (1.5, -3.5) - x); c += (1/N) * sum(delta c) with N = 4 (all clients).
    torch.testing.assert_close(new["w"], torch.tensor([1.25, -2.75]))
    torch.testing.assert_close(s.c["w"], torch.tensor([-0.5, 2.0]))
    torch.testing.assert_close(s.payload(new)[CONTROL + "w"], torch.tensor([-0.5, 2.0]))
    assert s.reply_spec({"w": ((2,), torch.float32)}) == {"w": ((2,), torch.float32),
                                                          CONTROL + "w": ((2,), torch.float32)}
    again = Scaffold(0.5, 4)
    again.load_state_dict(s.state_dict())
    torch.testing.assert_close(again.c["w"], s.c["w"])


def test_option_two_by_hand():
    c_i, c = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}
    x, y = {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}
    # c_i - c + (x - y) / (K lr) = 1 - 3 + 1 / (4 * 0.5) = -1.5
    torch.testing.assert_close(scaffold.option_two(c_i, c, x, y, 4, 0.5)["w"], torch.tensor([-1.5]))


def test_correction_is_added_to_the_clipped_gradient():
    """One SGD step with correction k: w - lr * (clip(grad) + k), by hand."""
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    s = TrainSettings(local_steps=1, local_epochs=None, batch_size=1, lr=0.1, optimizer="sgd")
    (w * torch.tensor([3.0, 4.0])).sum().backward()  # gradient (3, 4), norm 5: clipped to (0.6, 0.8)
    clip_and_step([w], make_optimizer([w], s), 1.0, correction=[torch.tensor([0.5, -2.0])])
    torch.testing.assert_close(w.detach(), torch.tensor([1.0 - 0.1 * 1.1, -1.0 - 0.1 * (0.8 - 2.0)]))


def test_scaffold_config_checks():
    base = ["model.name=tiny-llama", "federation.strategy=scaffold"]
    with pytest.raises(cfg.ConfigError, match="train.optimizer.*sgd"):
        cfg.load(None, base)
    with pytest.raises(cfg.ConfigError, match="federation.strategy"):
        cfg.load(None, [*base, "train.optimizer=sgd", "federation.paradigm=kd"])
    c = cfg.load(None, [*base, "train.optimizer=sgd"])
    from fedtune import registry
    assert registry.get("fedpeft").refusal(c, "flower") and registry.get("fedpeft").refusal(c, "local") is None
