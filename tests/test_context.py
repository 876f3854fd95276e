"""RunContext owns the resources a run makes (e.g. KD's separate client model) and releases them once."""

from __future__ import annotations

from pathlib import Path

from fedtune.context import RunContext
from fedtune.progress import Bars


def make_ctx() -> RunContext:
    return RunContext(config=None, model=None, tokenizer=None, data=None, device="cpu", bars=Bars(quiet=True),
                      log=lambda r: None, score=lambda: 0.0, path=Path("."))


def test_owned_resources_are_made_once_and_released_newest_first_on_close():
    ctx, released, made = make_ctx(), [], []

    def make(name):
        made.append(name)
        return name

    assert ctx.owned("a", lambda: make("A"), released.append) == "A"
    assert ctx.owned("a", lambda: make("A2"), released.append) == "A"  # the same resource, not made again
    ctx.owned("b", lambda: make("B"), released.append)
    assert made == ["A", "B"] and released == []
    ctx.close()
    assert released == ["B", "A"]
    ctx.close()  # closing twice releases nothing twice
    assert released == ["B", "A"]


def test_two_runs_never_share_an_owned_resource():
    one, two = make_ctx(), make_ctx()
    assert one.owned("model", object, lambda m: None) is not two.owned("model", object, lambda m: None)
