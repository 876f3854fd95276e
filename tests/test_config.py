from __future__ import annotations

import pytest

from fedtune import config as cfg


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_overrides_apply():
    c = cfg.load(None, ["federation.rounds=7", "train.lr=1e-3", "peft.target_modules=[q_proj]"])
    assert c.federation.rounds == 7
    assert c.train.lr == pytest.approx(1e-3)
    assert c.peft.target_modules == ["q_proj"]
    assert c.model.name == "smollm2-135m-instruct"


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = write(tmp_path, "name: x\nfederation:\n  rounds: 2\n  clients_per_roud: 2\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(p)
    msg = str(e.value)
    assert f"{p}:4:" in msg
    assert "federation.clients_per_roud" in msg
    assert "Did you mean 'clients_per_round'" in msg


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(cfg.ConfigError, match="Did you mean 'federation'"):
        cfg.load(write(tmp_path, "federaton:\n  rounds: 2\n"))


def test_wrong_type_names_field_and_expected_type(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: eight\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(p)
    assert f"{p}:2:" in str(e.value) and "train.batch_size" in str(e.value) and "expected int" in str(e.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(None, ["data.partition=dirichlett"])
    assert "'iid', 'dirichlet', 'by_field', 'quantity'" in str(e.value)
    assert "Did you mean 'dirichlet'" in str(e.value)


def test_impossible_values_stop_before_work(tmp_path):
    p = write(tmp_path, "federation:\n  num_clients: 3\n  clients_per_round: 5\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(p)
    assert "federation.clients_per_round = 5" in str(e.value) and "num_clients (3)" in str(e.value)
    assert f"{p}:3:" in str(e.value)
    with pytest.raises(cfg.ConfigError, match="exactly one"):
        cfg.load(None, ["train.local_epochs=1"])
    with pytest.raises(cfg.ConfigError, match="train.lr"):
        cfg.load(None, ["train.lr=0"])
    with pytest.raises(cfg.ConfigError, match="label_words"):
        cfg.load(None, ["data.source=reviews.csv"])


def test_label_words_mapping_keys_become_strings():
    c = cfg.load(None, ["data.source=x.tsv", "data.label_words={0: negative, 1: positive}"])
    assert c.data.label_words == {"0": "negative", "1": "positive"}


def test_bad_override_syntax():
    with pytest.raises(cfg.ConfigError, match="section.key=value"):
        cfg.load(None, ["federation.rounds"])


def test_resolved_yaml_round_trips():
    c = cfg.load(None, ["federation.rounds=3", "data.alpha=0.1"])
    import yaml

    again = cfg.from_dict(yaml.safe_load(cfg.to_yaml(c)))
    assert again == c


def test_every_example_config_loads_and_starts_with_its_command():
    from conftest import EXAMPLES

    files = sorted(EXAMPLES.glob("*.yaml"))
    assert files
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# fedtune ") and f.name in first, f
        cfg.load(f)


@pytest.mark.parametrize("field", ["kd.distill_steps", "kd.server_steps"])
def test_negative_kd_steps_are_reported_with_the_users_value(field):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(None, [f"{field}=-1"])
    assert f"{field} = -1 is not allowed" in str(e.value) and ">= 0" in str(e.value)
    assert "= 0 is not allowed" not in str(e.value)
    assert getattr(cfg.load(None, [f"{field}=0"]).kd, field.split(".")[1]) == 0  # 0 skips the distillation


def test_kd_top_k_must_be_positive():
    with pytest.raises(cfg.ConfigError, match=r"kd.top_k = 0 is not allowed: a positive integer\."):
        cfg.load(None, ["kd.top_k=0"])
