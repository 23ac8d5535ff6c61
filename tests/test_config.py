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


def test_recipe_file_merges_strictly(tmp_path):
    """A recipe's configs/train/<recipe>.yaml may add only the keys its recipe class declares
    (``Recipe.config_keys``); a typo elsewhere is a one-line error naming the file and the key."""
    from training.train import DEFAULT_CONFIG, merge_recipe_file
    from curation.common.config import load_yaml

    base = load_yaml(DEFAULT_CONFIG)
    good = tmp_path / "diht.yaml"
    good.write_text("recipe: diht\nloss:\n  hnnce: {alpha: 1.0, beta: 0.5}\n  distill: {enabled: false}\n")
    cfg = merge_recipe_file(base, good, "diht")
    assert cfg["loss"]["hnnce"] == {"alpha": 1.0, "beta": 0.5} and cfg["train"] == base["train"]
    typo = tmp_path / "typo.yaml"
    typo.write_text("recipe: diht\nloss:\n  hnnce: {alpha: 1.0}\ntrain:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError) as err:
        merge_recipe_file(base, typo, "diht")
    message = str(err.value)
    assert "\n" not in message and str(typo) in message and "'train.warmup_step'" in message
    other = tmp_path / "other.yaml"
    other.write_text("loss:\n  ssl: {name: none}\n")  # the improved recipe's key, not diht's
    with pytest.raises(ConfigError, match="'loss.ssl'"):
        merge_recipe_file(base, other, "diht")


def test_recipe_import_failure_is_not_unknown_recipe(tmp_path, monkeypatch):
    """A recipe module whose import fails (a missing dependency) raises that error; only a name
    no module registers is 'unknown recipe'."""
    from training import recipes

    (tmp_path / "broken_recipe_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(recipes.RECIPE_MODULES, "broken", "broken_recipe_mod")
    with pytest.raises(ModuleNotFoundError) as err:
        recipes.recipe_class("broken")
    assert err.value.name == "no_such_dependency_xyz"
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        recipes.recipe_class("nope")


def test_typed_view_checks_presence_types_and_choices():
    """A job's config is parsed once into frozen dataclasses that declare no defaults (the YAML
    holds them): a missing key, an unknown key, a wrong type or a value outside a ``Literal`` is a
    one-line error naming the dotted key; ``as_dict`` gives the YAML-shaped data back."""
    import dataclasses
    from typing import Literal

    from curation.common.config import as_dict, typed_view

    @dataclasses.dataclass(frozen=True)
    class Inner:
        min: int
        measure: Literal["verb", "nsubj_verb"]
        threshold: float | None

    @dataclasses.dataclass(frozen=True)
    class Outer:
        name: str
        enabled: bool
        inner: Inner
        languages: tuple[str, ...]
        options: dict
        use_gpu: bool | Literal["auto"]

    good = {"name": "x", "enabled": True, "languages": ["en"], "options": {"k": 1}, "use_gpu": "auto",
            "inner": {"min": 2.0, "measure": "verb", "threshold": "1e-3"}}
    view = typed_view(Outer, good)
    assert view.inner.min == 2 and isinstance(view.inner.min, int)
    assert view.inner.threshold == 1e-3 and view.languages == ("en",) and view.use_gpu == "auto"
    assert as_dict(view) == {**good, "inner": {"min": 2, "measure": "verb", "threshold": 1e-3}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.name = "y"
    bad = [({"inner": {**good["inner"], "min": 1.5}}, "inner.min must be an integer"),
           ({"inner": {**good["inner"], "measure": "verbs"}}, "inner.measure must be one of 'verb', 'nsubj_verb'"),
           ({"enabled": "yes"}, "enabled must be true or false"),
           ({"use_gpu": "maybe"}, "use_gpu must be one of bool, 'auto'"),
           ({"extra": 1}, "unknown config key 'extra'"),
           ({"inner": {"min": 1, "measure": "verb"}}, "missing config key 'inner.threshold'")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            typed_view(Outer, {**good, **change})


def test_the_curation_yaml_parses_as_its_typed_view():
    """cat_filter.yaml is the one place its defaults live: its typed view (curation/settings.py)
    takes every key, types each filter's section by the filter's own ``Settings``, and gives the
    YAML back; a wrong value is an error naming the dotted key."""
    from curation.caption_filters import ActionSettings, ComplexitySettings
    from curation.common.config import as_dict
    from curation.ocr import TextSpottingConfig
    from curation.settings import curation_config

    cfg = build_config(DEFAULT)
    view = curation_config(cfg)
    assert list(view.filters) == ["complexity", "action", "text_spotting"]  # the cascade's order
    assert isinstance(view.filters["complexity"], ComplexitySettings)
    assert isinstance(view.filters["action"], ActionSettings)
    assert isinstance(view.filters["text_spotting"], TextSpottingConfig)
    assert view.stages.stage("ocr") is view.stages.ocr and view.ingest.rows_per_block == 256
    plain = as_dict(view)
    assert {k: as_dict(v) for k, v in view.filters.items()} == cfg["filters"]
    assert plain["stages"] == {**cfg["stages"], "extra": {}}
    assert {k: v for k, v in plain.items() if k not in ("filters", "stages", "from_url")} == \
        {k: v for k, v in cfg.items() if k not in ("filters", "stages")}
    assert curation_config({**cfg, "from": "scored"}).from_url == "scored"  # cat_select's from=
    bad = [(["filters.complexity.measure=scene"],
            "filters.complexity.measure must be one of 'scene_graph', 'max_children', 'entity_edges'"),
           (["filters.text_spotting.measure=words"], "filters.text_spotting.measure must be one of"),
           (["stages.caption.num_cpus=half"], "stages.caption.num_cpus must be a number"),
           (["ray.dashboard=null"], "ray.dashboard must be true or false")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            curation_config(build_config(DEFAULT, overrides=overrides))


def test_a_plug_in_filter_declares_its_sections_view():
    """A filter's ``Settings`` is parsed from its section; its stage's resources come from
    ``stages.<stage>`` over the filter's ``resources``; a section no filter claims is refused."""
    import dataclasses

    from curation.filters import FILTER_TYPES, Filter, build_filters, register_filter
    from curation.settings import curation_config

    @dataclasses.dataclass(frozen=True)
    class WordsSettings:
        enabled: bool
        min: int

    @register_filter
    class Words(Filter):
        name, stage, Settings = "words", "words", WordsSettings

    try:
        cfg = build_config(DEFAULT)
        cfg["filters"]["words"] = {"enabled": True, "min": 3.0}
        cfg["stages"]["words"] = {"actors": 0}
        view = curation_config(cfg)
        assert view.filters["words"] == WordsSettings(enabled=True, min=3)
        assert view.stages.stage("words").actors == 0 and view.stages.stage("words").num_cpus == 0.25
        words = build_filters(view)[-1]
        assert words.cfg.min == 3 and words.enabled and not words.evaluate_all
        cfg["filters"]["words"] = {"enabled": True, "minimum": 3}
        with pytest.raises(ConfigError, match="unknown config key 'filters.words.minimum'"):
            curation_config(cfg)
        cfg["filters"]["wrds"] = cfg["filters"].pop("words")
        with pytest.raises(ValueError, match="filters.wrds: no such filter"):
            curation_config(cfg)
        with pytest.raises(ConfigError, match="unknown config key 'stages.words'"):
            curation_config(cfg, strict=False)  # no filter of that stage any more
        del cfg["stages"]["words"]
        assert "wrds" not in curation_config(cfg, strict=False).filters
    finally:
        FILTER_TYPES.pop("words")
