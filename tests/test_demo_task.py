"""Tests for fedtune.data.demo: the generated ticket-intent task."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from fedtune.data.demo import DEMO_LABELS, DEMO_PROMPT, make_demo_task
from fedtune.data.partition import partition_indices, skew


@pytest.fixture(scope="module")
def task() -> tuple[list[dict], list[dict]]:
    return make_demo_task(seed=0)


def test_labels_and_prompt() -> None:
    assert tuple(DEMO_LABELS) == ("billing", "shipping", "technical", "account", "refund", "feedback")
    prompt = DEMO_PROMPT.format(text="my parcel never came")
    assert "my parcel never came" in prompt
    assert all(label in prompt for label in DEMO_LABELS)
    assert "one word" in prompt.lower()


def test_sizes_fields_and_label_set(task: tuple[list[dict], list[dict]]) -> None:
    train, test = task
    assert len(train) == 2000 and len(test) == 300
    for record in train + test:
        assert set(record) == {"text", "label", "product", "channel"}
        assert record["label"] in DEMO_LABELS
        assert isinstance(record["text"], str) and record["text"].strip()
    assert len({r["product"] for r in train}) >= 5
    assert {"email", "chat", "phone transcript"} <= {r["channel"] for r in train}


def test_deterministic_per_seed(task: tuple[list[dict], list[dict]]) -> None:
    assert make_demo_task(seed=0) == task
    other_train, _ = make_demo_task(seed=1)
    assert [r["text"] for r in other_train] != [r["text"] for r in task[0]]


def test_balanced_labels(task: tuple[list[dict], list[dict]]) -> None:
    for split in task:
        counts = Counter(r["label"] for r in split)
        assert set(counts) == set(DEMO_LABELS)
        expected = len(split) / len(DEMO_LABELS)
        assert all(abs(c - expected) <= 0.1 * expected + 1 for c in counts.values()), counts


def test_train_test_disjoint_and_varied(task: tuple[list[dict], list[dict]]) -> None:
    train, test = task
    train_texts = [r["text"] for r in train]
    assert not set(train_texts) & {r["text"] for r in test}
    assert len(set(train_texts)) / len(train_texts) > 0.9
    # Variety beyond slot filling: strip digits and product names, many distinct skeletons remain.
    skeletons = {re.sub(r"\d+", "#", r["text"].lower().replace(r["product"].lower(), "P")) for r in train}
    assert len(skeletons) > 500


def test_length_is_mostly_ticket_sized(task: tuple[list[dict], list[dict]]) -> None:
    lengths = [len(r["text"].split()) for r in task[0]]
    in_range = sum(12 <= n <= 50 for n in lengths) / len(lengths)
    assert in_range > 0.9, in_range


def test_not_solvable_by_label_keyword(task: tuple[list[dict], list[dict]]) -> None:
    train, _ = task
    for label in DEMO_LABELS:
        texts = [r["text"].lower() for r in train if r["label"] == label]
        with_word = sum(label in text for text in texts) / len(texts)
        assert with_word < 0.5, (label, with_word)


def test_product_is_a_non_iid_field(task: tuple[list[dict], list[dict]]) -> None:
    train, _ = task
    labels = [r["label"] for r in train]
    products = [r["product"] for r in train]
    by_product = partition_indices("by_field", len(set(products)), 0, keys=products)
    iid = partition_indices("iid", len(by_product), 0, n=len(train))
    assert skew(by_product, labels) > skew(iid, labels) + 0.1


def test_custom_sizes_and_bad_sizes() -> None:
    train, test = make_demo_task(seed=3, n_train=12, n_test=0)
    assert len(train) == 12 and test == []
    with pytest.raises(ValueError, match="n_train"):
        make_demo_task(n_train=0)
    with pytest.raises(ValueError, match="n_test"):
        make_demo_task(n_test=-1)
