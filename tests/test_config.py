"""KENConfig: validation, JSON round trip, and which parameters it targets."""

from __future__ import annotations

import json

import pytest

from ken_hf import KENConfig
from ken_hf.config import CONFIG_NAME


def test_exactly_one_of_k_and_keep_ratio():
    with pytest.raises(ValueError, match="exactly one of k and keep_ratio"):
        KENConfig()
    with pytest.raises(ValueError, match="exactly one of k and keep_ratio"):
        KENConfig(k=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        KENConfig(k=0)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        KENConfig(keep_ratio=1.5)
    with pytest.raises(ValueError, match="not a valid regex"):
        KENConfig(k=3, target_modules="(")


def test_k_for_row_width():
    assert KENConfig(k=300).k_for(768) == 300
    assert KENConfig(keep_ratio=0.25).k_for(384) == 96
    assert KENConfig(keep_ratio=0.001).k_for(384) == 1


def test_json_round_trip(tmp_path):
    config = KENConfig(
        keep_ratio=0.5,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        base_model_name_or_path="org/base",
        base_model_revision="abc123",
    )
    config.save_pretrained(tmp_path)
    assert KENConfig.from_pretrained(tmp_path) == config
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["keep_ratio"] == 0.5 and saved["library_version"]


def test_unknown_keys_warn_and_missing_keys_fail(tmp_path):
    values = KENConfig(k=4, base_model_name_or_path="b").to_dict() | {"lora_alpha": 16}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(values))
    with pytest.warns(UserWarning, match="unknown key.*lora_alpha"):
        KENConfig.from_pretrained(tmp_path)
    del values["base_model_name_or_path"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(values))
    with pytest.raises(ValueError, match="lacks required key.*base_model_name_or_path"):
        KENConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        KENConfig.from_pretrained(tmp_path)


def test_targets_exclude_and_modules_to_save():
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert KENConfig(k=1).targets(name)
    assert KENConfig(k=1, target_modules=["query"]).targets(name)
    assert not KENConfig(k=1, target_modules=["key"]).targets(name)
    assert KENConfig(k=1, target_modules=r".*layer\.0\..*").targets(name)
    assert not KENConfig(k=1, exclude_modules=["attention.self.query"]).targets(name)
    config = KENConfig(k=1, modules_to_save=["classifier"])
    assert config.saves_whole("classifier.bias") and not config.targets("classifier.bias")
    assert not config.saves_whole("bert.pooler.dense.bias")
