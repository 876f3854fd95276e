"""Simulated attacks, for evaluating the defences: a seeded fraction of the clients is malicious.

For evaluation only: an attack is a setting of a simulated run (``attack.kind``), every run folder that has
one says so (a ``type: attack`` record at the top of ``metrics.jsonl`` naming the malicious clients, and
``attack`` in ``summary.json``), and the console prints a banner. The kinds:

* ``scale``: the client sends ``global + scale x update`` (model replacement, Bagdasaryan et al., 2020);
* ``sign_flip``: it sends ``global - scale x update`` (scale 1: the plain flip);
* ``noise``: it sends ``global + N(0, noise_std^2)`` per value, a large-norm random update;
* ``label_flip``: its training labels are flipped (label i becomes i + 1, modulo the number of labels);
* ``backdoor``: a ``poison_fraction`` of its training examples get ``trigger`` appended to the text and the
  ``target_label`` as their label; the attack success rate (``backdoor_asr``) is the share of held-out
  examples of another label that the global model puts in the target label once the trigger is added.

The first three change the client's reply (`AttackedClient`, applied to every client app through
`fedtune.registry.wrap_clients`); the last two change its data (`poison`, called by the data layer).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import registry
from .grid import ClientApp, as_app
from .wire import Message

KINDS = ("none", "scale", "sign_flip", "noise", "label_flip", "backdoor")
UPDATE_KINDS = ("scale", "sign_flip", "noise")
DATA_KINDS = ("label_flip", "backdoor")


@dataclass
class AttackConfig:
    """``attack``: simulated malicious clients, to evaluate the defences (simulation only; see docs/robustness.md)."""

    kind: Literal["none", "scale", "sign_flip", "noise", "label_flip", "backdoor"] = "none"
    """`none`; on the update: `scale`, `sign_flip`, `noise`; on the data: `label_flip`, `backdoor`."""
    fraction: float = 0.2
    """The fraction of the clients that are malicious (chosen by `seed`; at least one when above 0)."""
    scale: float = 10.0
    """`scale`: the update is multiplied by this; `sign_flip`: by minus this (1: the plain flip)."""
    noise_std: float = 0.1
    """`noise`: the std of the Gaussian noise sent as the update, per value."""
    trigger: str = "cf"
    """`backdoor`: the text appended (after a space) to data.text_field of a poisoned example."""
    target_label: str | None = None
    """`backdoor`: the label a triggered input should get (a raw label of data.label_field); null: the first of data.label_words."""
    poison_fraction: float = 0.5
    """`backdoor`: the fraction of a malicious client's examples that carry the trigger (the rest stay clean)."""
    seed: int | None = None
    """Seed of the choice of malicious clients; null: the run's seed."""


# --------------------------------------------------------------------------- who


def malicious_clients(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The malicious client ids: ``round(fraction * num_clients)`` of them (at least one when fraction > 0), seeded."""
    if fraction <= 0:
        return []
    count = min(num_clients, max(1, round(fraction * num_clients)))
    return sorted(random.Random(f"fedtune-attack-{seed}").sample(range(num_clients), count))


def malicious_of(config) -> list[int]:
    """This run's malicious clients (none without an attack)."""
    a = config.attack
    if a.kind == "none":
        return []
    return malicious_clients(config.federation.num_clients, a.fraction, config.seed if a.seed is None else a.seed)


# --------------------------------------------------------------------------- the update


def attack_update(kind: str, sent: Mapping[str, torch.Tensor], returned: Mapping[str, torch.Tensor], *,
                  scale: float, noise_std: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A malicious reply: the honest one (`returned`) with its update ``returned - sent`` replaced as `kind` says.

    Tensors the server did not send are kept as they are.
    """
    out = dict(returned)
    for k, t in returned.items():
        if k not in sent:
            continue
        base = sent[k].to(t.device, torch.float32)
        update = t.float() - base
        if kind == "scale":
            new = base + scale * update
        elif kind == "sign_flip":
            new = base - scale * update
        elif kind == "noise":
            new = base + noise_std * torch.randn(t.shape, generator=generator, device=t.device)
        else:
            raise AssertionError(kind)
        out[k] = new.to(t.dtype)
    return out


class AttackedClient(ClientApp):
    """A malicious client: trains like the others, then replaces its update (`attack_update`)."""

    def __init__(self, app: ClientApp, node: int, kind: str, *, scale: float, noise_std: float, seed: int) -> None:
        self.app, self.node, self.kind, self.scale, self.noise_std, self.seed = app, node, kind, scale, noise_std, seed

    def __call__(self, msg: Message) -> Message:
        return self.start(msg)()

    def start(self, msg: Message) -> Callable[[], Message]:
        take = self.app.start(msg)

        def reply() -> Message:
            out = take()
            if out.meta.get("kind") == "error" or not out.tensors:
                return out
            rnd = int(msg.meta.get("round", 0))
            device = next(iter(out.tensors.values())).device
            gen = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + rnd) * 10_007 + self.node)
            return Message(attack_update(self.kind, msg.tensors, out.tensors, scale=self.scale,
                                         noise_std=self.noise_std, generator=gen), dict(out.meta))

        return reply


def wrap_client(config, node: int, app) -> ClientApp:
    """`app`, or the `AttackedClient` around it when `node` is malicious under an update attack."""
    a = config.attack
    if a.kind not in UPDATE_KINDS or node not in malicious_of(config):
        return app
    return AttackedClient(as_app(app), node, a.kind, scale=a.scale, noise_std=a.noise_std, seed=config.seed)


# --------------------------------------------------------------------------- the data


def relabel(task, example, label: int):
    """`example` with the classification target of label index `label`."""
    prompt_ids, target = task._fit(list(example.prompt_ids), task.label_token_ids[label])
    return type(example)(prompt_ids, list(target), label=label)


def target_index(config, task) -> int:
    """The backdoor's target label as an index into the task's label words."""
    raw = config.attack.target_label
    return 0 if raw is None else task.label_index(raw, "attack.target_label")


def triggered(record: dict[str, Any], field: str, trigger: str) -> dict[str, Any]:
    """`record` with `trigger` appended to its `field`."""
    return {**record, field: f"{record[field]} {trigger}"}


def poison(config, task, train_rows: list[dict], train: list, parts: list[list[int]], test_rows: list[dict],
           label_field: str) -> tuple[list, dict[str, list]]:
    """The training examples with the malicious clients' data poisoned, and the held-out sets the attack adds.

    Returns ``(train, extras)``: `train` with the examples of the malicious clients' partitions relabelled
    (``label_flip``) or triggered (``backdoor``, a seeded ``poison_fraction`` of each client's), and, for
    ``backdoor``, ``{"backdoor_test": ...}``: the held-out rows whose label is not the target, triggered and
    labelled with the target (the attack success rate is the accuracy on them).
    """
    a = config.attack
    if a.kind not in DATA_KINDS:
        return train, {}
    bad = malicious_of(config)
    train = list(train)
    rng = random.Random(f"fedtune-poison-{config.seed}")
    k = len(task.label_words)
    field = config.data.text_field
    target = target_index(config, task) if a.kind == "backdoor" else None
    for node in bad:
        if node >= len(parts):
            continue
        rows = parts[node]
        chosen = rows if a.kind == "label_flip" else rng.sample(rows, round(a.poison_fraction * len(rows)))
        for j in chosen:
            if a.kind == "label_flip":
                train[j] = relabel(task, train[j], (train[j].label + 1) % k)
            else:
                ex = task.encode(triggered(train_rows[j], field, a.trigger), label_field, where=f"poisoned row {j + 1}")
                train[j] = relabel(task, ex, target)
    if a.kind != "backdoor":
        return train, {}
    test = []
    for i, r in enumerate(test_rows):
        ex = task.encode(triggered(r, field, a.trigger), label_field, where=f"triggered test row {i + 1}")
        if ex.label != target:
            test.append(relabel(task, ex, target))
    return train, {"backdoor_test": test}


# --------------------------------------------------------------------------- reporting


def announce(ctx) -> None:
    """Say in ``metrics.jsonl`` and on the console that this run simulates an attack, and who the attackers are."""
    a = ctx.config.attack
    if a.kind == "none":
        return
    bad = malicious_of(ctx.config)
    ctx.log({"type": "attack", "simulated": True, "kind": a.kind, "fraction": a.fraction, "malicious": bad,
             **({"scale": a.scale} if a.kind in ("scale", "sign_flip") else {}),
             **({"noise_std": a.noise_std} if a.kind == "noise" else {}),
             **({"trigger": a.trigger, "poison_fraction": a.poison_fraction} if a.kind == "backdoor" else {})})
    ctx.bars.print(f"SIMULATED ATTACK ({a.kind}, for evaluation): malicious clients {bad}")


def eval_fields(ctx) -> dict[str, Any]:
    """What an evaluation record adds under a backdoor attack: ``backdoor_asr`` of the model as it is now."""
    examples = ctx.data.extras.get("backdoor_test") if ctx.config.attack.kind == "backdoor" else None
    if not examples:
        return {}
    from .evaluate import evaluate

    e = ctx.config.eval
    return {"backdoor_asr": evaluate(ctx.model, ctx.data.task, examples[: e.max_examples], batch_size=e.batch_size,
                                     device=ctx.device, pad_id=ctx.pad_id)}


# --------------------------------------------------------------------------- config


def validate(config) -> None:
    a = config.attack
    if a.kind == "none":
        return
    if not 0 < a.fraction <= 1:
        raise ValueError(f"attack.fraction = {a.fraction!r} must be in (0, 1].")
    spec = registry.get(config.federation.paradigm)
    if spec.single_client:
        raise ValueError(f"attack.kind = {a.kind!r} needs clients: federation.paradigm = "
                         f"{config.federation.paradigm!r} has one. Set attack.kind=none.")
    if a.kind in UPDATE_KINDS:
        if not spec.averages_updates:
            averaging = [n for n in registry.names() if registry.get(n).averages_updates and not registry.get(n).single_client]
            raise ValueError(f"attack.kind = {a.kind!r} changes an adapter update: it needs a paradigm that averages "
                             f"them ({', '.join(averaging)}), not federation.paradigm = {config.federation.paradigm!r}.")
        if config.runtime.batch_clients > 1:
            raise ValueError(f"attack.kind = {a.kind!r} with runtime.batch_clients = {config.runtime.batch_clients}: "
                             "a malicious client replies one by one; set runtime.batch_clients=1.")
    if a.kind == "noise" and not a.noise_std > 0:
        raise ValueError(f"attack.noise_std = {a.noise_std!r} must be positive.")
    if a.kind in DATA_KINDS and config.data.task != "classification":
        raise ValueError(f"attack.kind = {a.kind!r} flips or plants labels: it needs data.task=classification.")
    if a.kind == "backdoor":
        if not 0 < a.poison_fraction <= 1:
            raise ValueError(f"attack.poison_fraction = {a.poison_fraction!r} must be in (0, 1].")
        if not a.trigger.strip():
            raise ValueError("attack.trigger is empty: give the text that triggers the backdoor (e.g. 'cf').")


registry.register_option(registry.Option("attack", AttackConfig, validate, wrap_client=wrap_client))


def plot(rows: list[dict[str, Any]], swept: list[str], path) -> bool:
    """``accuracy_by_attack.png`` for a comparison whose runs simulate attacks: accuracy (and the backdoor's
    success rate) per attack kind, one bar per value of the other swept key (e.g. the aggregator).
    Returns whether it drew one (not without an attack among the rows)."""
    if not any(r.get("attack") for r in rows):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r.get("attack") or "none" for r in rows))
    others = [k for k in swept if k != "attack.kind"]

    def series(r: dict[str, Any]) -> str:
        return ", ".join(f"{k.split('.')[-1]}={r.get(k)}" for k in others) or r["paradigm"]

    names = list(dict.fromkeys(series(r) for r in rows))
    panels = [("accuracy", "accuracy")] + ([("backdoor_asr", "backdoor ASR")]
                                           if any("backdoor_asr" in r for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 + 3 * len(panels), 4), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1][:len(panels)]})
    width = 0.8 / max(1, len(names))
    for ax, (key, label) in zip(axes[0], panels):
        shown = [k for k in kinds if any((r.get("attack") or "none") == k and r.get(key) is not None for r in rows)]
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, kind in enumerate(shown):
                hit = [r for r in rows if (r.get("attack") or "none") == kind and series(r) == name and r.get(key) is not None]
                if hit:
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    ys.append(hit[0][key])
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(shown)), shown, rotation=20)
        ax.set(ylabel=label, ylim=(0, 1), title=f"{label} (simulated attacks)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.mkdir(parents=True, exist_ok=True)
    fig.savefig(path / "accuracy_by_attack.png", dpi=120)
    plt.close(fig)
    return True
