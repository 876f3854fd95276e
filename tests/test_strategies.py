from __future__ import annotations

import pytest
import torch

from fedtune.strategies import FedAdam, FedAvg, FedAvgM, weighted_mean


def states(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]


def test_fedavg_equals_hand_computed_weighted_mean():
    s = states()
    n = [10.0, 30.0, 60.0]
    out = FedAvg().aggregate({k: torch.zeros_like(v) for k, v in s[0].items()}, list(zip(s, n)))
    for k in ("a", "b"):
        # element by element, written out by hand
        expected = (10 * s[0][k] + 30 * s[1][k] + 60 * s[2][k]) / 100
        torch.testing.assert_close(out[k], expected)


def test_weighted_mean_rejects_mismatch():
    s = states()
    with pytest.raises(ValueError, match="different keys"):
        weighted_mean([s[0], {"a": s[1]["a"]}], [1, 1])
    with pytest.raises(ValueError, match="not all zero"):
        weighted_mean(s, [0, 0, 0])


def test_fedavgm_with_zero_momentum_and_unit_lr_is_fedavg():
    s = states()
    g = {k: torch.ones_like(v) for k, v in s[0].items()}
    a = FedAvg().aggregate(g, [(x, 1.0) for x in s])
    b = FedAvgM(server_lr=1.0, momentum=0.0).aggregate(g, [(x, 1.0) for x in s])
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_fedavgm_momentum_accumulates():
    g = {"w": torch.zeros(2)}
    target = {"w": torch.ones(2)}  # every client moves to 1
    m = FedAvgM(server_lr=1.0, momentum=0.5)
    g1 = m.aggregate(g, [(target, 1.0)])  # v = -1 -> w = 1
    torch.testing.assert_close(g1["w"], torch.ones(2))
    g2 = m.aggregate(g1, [(target, 1.0)])  # delta 0, v = -0.5 -> w = 1.5
    torch.testing.assert_close(g2["w"], torch.full((2,), 1.5))


def test_fedadam_first_step_moves_by_lr_in_sign_direction():
    g = {"w": torch.zeros(3)}
    upd = {"w": torch.tensor([2.0, -1.0, 0.5])}
    out = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9).aggregate(g, [(upd, 1.0)])
    # m = 0.1 g, v = 0.01 g^2 -> m / sqrt(v) = sign(g)
    torch.testing.assert_close(out["w"], 0.1 * torch.sign(upd["w"]), atol=1e-6, rtol=1e-5)


def test_weighted_mean_of_packed_states_equals_the_per_tensor_mean():
    """States that are views of one buffer each (as decoded replies are) take the one-add-per-client path."""
    from fedtune.strategies import packed

    s = states(3)
    keys = list(s[0])
    flat = [torch.cat([x[k].reshape(-1) for k in keys]) for x in s]
    views = [dict(zip(keys, (part.view(x[k].shape) for part, k in zip(f.split([x[k].numel() for k in keys]), keys))))
             for f, x in zip(flat, s)]
    assert packed([views[0][k] for k in keys]).data_ptr() == flat[0].data_ptr()
    assert packed([s[0][k] for k in keys]) is None  # separate tensors: the per-tensor path
    assert packed([views[0][k] for k in reversed(keys)]) is None  # out of order
    n = [1.0, 2.0, 5.0]
    out = weighted_mean(views, n)
    for k in keys:
        torch.testing.assert_close(out[k], (1 * s[0][k] + 2 * s[1][k] + 5 * s[2][k]) / 8)
    mixed = weighted_mean([views[0], s[1], views[2]], n)  # one unpacked state: the per-tensor path, same result
    for k in keys:
        torch.testing.assert_close(mixed[k], out[k])


def test_packed_states_with_other_shapes_of_the_same_total_are_refused():
    """One buffer each is not enough: tensor by tensor the shapes must agree, as on the per-tensor path."""
    a = torch.arange(8.0)
    b = torch.arange(8.0) + 1
    one = {"x": a[:4].view(2, 2), "y": a[4:]}
    other = {"x": b[:6].view(2, 3), "y": b[6:]}  # same keys and total length, other shapes
    with pytest.raises(RuntimeError):
        weighted_mean([one, other], [1.0, 1.0])


def test_server_lr_defaults_are_one_value_each_in_class_factory_and_config_docs():
    from pathlib import Path

    from fedtune import config
    from fedtune.strategies import make_strategy

    assert FedAdam.DEFAULT_SERVER_LR == 1e-3 and FedAvgM.DEFAULT_SERVER_LR == 1.0
    assert FedAdam().server_lr == make_strategy("fedadam", None, 0.9).server_lr == FedAdam.DEFAULT_SERVER_LR
    assert FedAvgM().server_lr == make_strategy("fedavgm", None, 0.9).server_lr == FedAvgM.DEFAULT_SERVER_LR
    assert make_strategy("fedadam", 0.05, 0.9).server_lr == 0.05
    # the field docstring of federation.server_lr states the same defaults
    source = Path(config.__file__).read_text()
    doc = source[source.index("server_lr: float | None = None"):].split('"""')[1]
    rest = doc[doc.index("their defaults, ") + len("their defaults, "):]
    defaults = rest[:rest.index(":")]
    assert [float(v) for v in defaults.replace(" and ", ", ").split(", ")[:2]] == [FedAvgM.DEFAULT_SERVER_LR,
                                                                                  FedAdam.DEFAULT_SERVER_LR]
