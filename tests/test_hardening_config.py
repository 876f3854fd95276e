"""Bad input that used to slip through: each is refused with a message naming the problem and the fix."""

from __future__ import annotations

import pytest

from fedtune import config as cfg
from fedtune.cli import main


@pytest.mark.parametrize("override, field, allowed", [
    ("data.max_length=100000000", "data.max_length", "at most"),
    ("train.lr=1e6", "train.lr", "(0, 10]"),
    ("train.lr=.inf", "train.lr", "finite"),
    ("train.lr=.nan", "train.lr", "finite"),
    ("train.max_grad_norm=-1", "train.max_grad_norm", "positive number"),
    ("name=../escaped", "name", "without '/'"),
    ("name=/tmp/abs", "name", "without '/'"),
    ("name=..", "name", "without '/'"),
])
def test_out_of_range_values_are_refused_with_the_allowed_range(override, field, allowed):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(None, [override])
    assert field in str(err.value) and allowed in str(err.value)


def test_an_empty_config_file_is_refused_naming_set_and_an_example(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(cfg.ConfigError, match=r"empty\.yaml' is empty.*quickstart-tiny\.yaml.*--set"):
        cfg.load(empty)


def test_binary_garbage_as_yaml_or_jsonl_names_the_file(tmp_path):
    from fedtune.data.sources import load_records

    junk = bytes(range(128, 256)) * 4
    (tmp_path / "c.yaml").write_bytes(junk)
    with pytest.raises(cfg.ConfigError, match="c.yaml"):
        cfg.load(tmp_path / "c.yaml")
    (tmp_path / "d.jsonl").write_bytes(junk)
    with pytest.raises(ValueError, match="d.jsonl"):
        load_records(str(tmp_path / "d.jsonl"))
    (tmp_path / "e.jsonl.gz").write_bytes(junk)
    with pytest.raises(ValueError, match="e.jsonl.gz"):
        load_records(str(tmp_path / "e.jsonl.gz"))


def test_a_directory_that_is_not_a_model_says_so(tmp_path):
    from fedtune.models import load_base

    with pytest.raises(ValueError, match="not a model: it has no config.json"):
        load_base(str(tmp_path))


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code = main(["run", "--set", "model.name=tiny-llama", "--out", str(tmp_path / "f"), "--quiet"])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err
