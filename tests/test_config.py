import pytest

from curation.common.config import CONFIG_DIR, ConfigError, apply_overrides, build_config

DEFAULT = CONFIG_DIR / "curation" / "cat_filter.yaml"


def test_overrides_are_typed_and_nested():
    cfg = build_config(DEFAULT, overrides=["filters.complexity.min=2", "filters.action.enabled=false",
                                           "input=s3://bucket/laion", "ray.num_cpus=4"])
    assert cfg["filters"]["complexity"]["min"] == 2
    assert cfg["filters"]["action"]["enabled"] is False
    assert cfg["input"] == "s3://bucket/laion"
    assert cfg["ray"]["num_cpus"] == 4
    # untouched siblings keep their defaults
    assert cfg["filters"]["complexity"]["measure"] == "scene_graph"


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="filters.complexty"):
        build_config(DEFAULT, overrides=["filters.complexty.min=2"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        build_config(DEFAULT, overrides=["filters.complexity.min"])


def test_user_file_merges_over_defaults_then_cli(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("filters:\n  complexity:\n    measure: entity_edges\n    min: 3\n")
    cfg = build_config(DEFAULT, user, ["filters.complexity.min=2"])
    assert cfg["filters"]["complexity"]["measure"] == "entity_edges"
    assert cfg["filters"]["complexity"]["min"] == 2
    assert cfg["filters"]["action"]["measure"] == "verb"


def test_free_form_sections_accept_new_keys():
    cfg = apply_overrides({"extra": {}, "a": 1}, ["extra.anything=3"])
    assert cfg == {"extra": {"anything": 3}, "a": 1}
