"""Tests for fedtune.data.sources: file formats, hf: sources and error messages."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from fedtune.data.sources import load_records, require_fields

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

RECORDS = [
    {"text": "first, with a comma", "label": "pos"},
    {"text": 'second "quoted" one', "label": "neg"},
    {"text": "third\twith a tab", "label": "pos"},
]


def _write_delimited(path: Path, delimiter: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(RECORDS)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n", encoding="utf-8")
    assert load_records(str(path)) == RECORDS


def test_jsonl_gz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in RECORDS))
    assert load_records(str(path)) == RECORDS


def test_json_list_and_wrapped_object(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(RECORDS), encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": RECORDS}), encoding="utf-8")
    assert load_records(str(plain)) == RECORDS
    assert load_records(str(wrapped)) == RECORDS


def test_json_object_with_two_lists_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"train": RECORDS, "test": RECORDS}), encoding="utf-8")
    with pytest.raises(ValueError, match="exactly one list-valued key"):
        load_records(str(path))


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_delimited_round_trip_keeps_strings(tmp_path: Path, suffix: str, delimiter: str) -> None:
    path = tmp_path / f"data{suffix}"
    _write_delimited(path, delimiter)
    assert load_records(str(path)) == RECORDS
    numbers = tmp_path / f"numbers{suffix}"
    numbers.write_text(f"x{delimiter}label\nhello{delimiter}1\n", encoding="utf-8")
    assert load_records(str(numbers)) == [{"x": "hello", "label": "1"}]


def test_csv_row_with_wrong_column_count_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,1\ntoo,many,cells\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        load_records(str(path))


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"text": r["text"], "label": i} for i, r in enumerate(RECORDS)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_records(str(path)) == rows
    assert load_records(str(path), limit=2) == rows[:2]


def test_limit_keeps_first_rows(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"i": i}) for i in range(10)), encoding="utf-8")
    assert load_records(str(path), limit=3) == [{"i": 0}, {"i": 1}, {"i": 2}]
    with pytest.raises(ValueError, match="limit"):
        load_records(str(path), limit=0)


def test_hf_source_from_local_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    # Keep the Arrow cache inside tmp_path and make sure nothing reaches for the network.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "my_set"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS), encoding="utf-8")
    (folder / "test.jsonl").write_text(json.dumps({"text": "held out", "label": "neg"}), encoding="utf-8")

    assert load_records(f"hf:{folder}") == RECORDS
    assert load_records(f"hf:{folder}", split="test") == [{"text": "held out", "label": "neg"}]
    assert load_records(f"hf:{folder}", limit=1) == RECORDS[:1]
    with pytest.raises(ValueError, match="validation"):
        load_records(f"hf:{folder}", split="validation")


def test_split_on_local_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]), encoding="utf-8")
    with pytest.raises(ValueError, match="only applies to 'hf:'"):
        load_records(str(path), split="test")


def test_missing_file_names_path_and_cwd_rule(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError) as info:
        load_records(str(missing))
    assert str(missing) in str(info.value)
    assert "current working directory" in str(info.value)


def test_unknown_extension_lists_allowed(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_records(str(path))
    for extension in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        assert extension in str(info.value)


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.json", "  \n"), ("header.csv", "text,label\n")])
def test_empty_sources_are_rejected(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="empty|no records"):
        load_records(str(path))


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_records(str(path))
    assert "line 3" in str(info.value)
    assert "broken.jsonl" in str(info.value)


@pytest.mark.parametrize("name, content, where", [
    ("rows.jsonl", '{"text": "ok"}\n[1, 2]\n', "line 2"),
    ("rows.json", '[{"text": "ok"}, "just text"]', "record 2"),
])
def test_row_that_is_not_an_object(tmp_path: Path, name: str, content: str, where: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=where):
        load_records(str(path))


def test_require_fields_names_row_field_and_suggestion() -> None:
    records = [{"text": "a", "label": "x"}, {"text": "b", "lable": "y"}]
    require_fields(records[:1], ["text", "label"], "data.jsonl")
    with pytest.raises(ValueError) as info:
        require_fields(records, ["text", "label"], "data.jsonl")
    message = str(info.value)
    assert "record 2" in message
    assert "'label'" in message
    assert "data.jsonl" in message
    assert "did you mean 'lable'" in message


def test_require_fields_without_near_miss_lists_fields() -> None:
    with pytest.raises(ValueError) as info:
        require_fields([{"sentence": "a", "score": 1}], ["label"], "x.csv")
    assert "record 1" in str(info.value)
    assert "['score', 'sentence']" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_sst2_dev_from_shared_data() -> None:
    path = SHARED_DATA / "sst2" / "dev.tsv"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    records = load_records(str(path))
    assert len(records) == 872
    require_fields(records, ["sentence", "label"], str(path))
    assert set(records[0]) == {"sentence", "label"}
    assert {r["label"] for r in records} == {"0", "1"}
