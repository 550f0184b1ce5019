import dataclasses
import json

import pytest

from hf_prune import MagnitudePruningCallback, PruningConfig
from hf_prune.constants import CONFIG_NAME
from hf_prune.methods.han import HanConfig, HanPruningCallback
from hf_prune.methods.rpp import RPPCallback, RPPConfig


def test_round_trip_through_json(tmp_path):
    config = PruningConfig(initial_sparsity=0.5, final_sparsity=0.9, schedule="iterative", start_step=10,
                           end_step=1000, pruning_frequency=100, scheme="class-uniform",
                           target_modules=["query", "value"], exclude_modules="bert\\.encoder\\.layer\\.0\\..*")
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert written["config_type"] == "PruningConfig" and "hf_prune_version" in written
    loaded = PruningConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert PruningConfig.from_dict(config.to_dict()) == config


def test_unknown_keys_from_newer_versions_are_dropped(caplog):
    data = {**PruningConfig(final_sparsity=0.7).to_dict(), "from_the_future": 1}
    assert PruningConfig.from_dict(data).final_sparsity == 0.7
    assert "from_the_future" in caplog.text


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PruningConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"final_sparsity": 1.0}, "final_sparsity"),
        ({"final_sparsity": -0.1}, "final_sparsity"),
        ({"initial_sparsity": 1.5}, "initial_sparsity"),
        ({"initial_sparsity": 0.6, "final_sparsity": 0.5}, "final_sparsity"),
        ({"schedule": "linear"}, "schedule"),
        ({"scheme": "global"}, "scheme"),
        ({"criterion": "movement"}, "criterion"),
        ({"class_granularity": "row"}, "class_granularity"),
        ({"start_step": -1}, "start_step"),
        ({"start_step": 10, "end_step": 10}, "end_step"),
        ({"pruning_frequency": 0}, "pruning_frequency"),
        ({"schedule": "oneshot", "end_step": 100}, "end_step"),  # oneshot prunes once: it would be ignored
        ({"schedule": "oneshot", "pruning_frequency": 10}, "pruning_frequency"),
        ({"schedule": "oneshot", "initial_sparsity": 0.2}, "initial_sparsity"),
        ({"target_modules": "("}, "target_modules"),
        ({"exclude_modules": []}, "exclude_modules"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        PruningConfig(**kwargs)


@pytest.mark.parametrize("field", ["initial_sparsity", "final_sparsity"])
def test_a_percentage_for_a_sparsity_is_refused_with_the_fraction_it_means(field):
    with pytest.raises(ValueError, match=rf"`{field}` must be a number in \[0, 1\); got 90\. A fraction is "
                                         r"expected: 0\.9 for 90%\."):
        PruningConfig(**{field: 90, "final_sparsity": 90})
    with pytest.raises(ValueError, match=r"got 150\.$"):  # no percentage either: no hint
        PruningConfig(final_sparsity=150)


# ------------------------------------------------------------------------------- booleans must be booleans
def _bool_fields(config_class):
    return [f.name for f in dataclasses.fields(config_class) if f.type in ("bool", bool)]


@pytest.mark.parametrize("config_class", [PruningConfig, RPPConfig, HanConfig], ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", ["no", "false", 0, 1, None, 1.0])
def test_every_bool_field_refuses_truthy_and_falsy_non_booleans(config_class, value):
    names = _bool_fields(config_class)
    assert "prune_head" in names and (config_class is not HanConfig or "adjust_dropout" in names)
    for name in names:
        with pytest.raises(ValueError, match=f"`{name}` must be True or False; got {value!r}"):
            config_class(**{name: value})
        assert getattr(config_class(**{name: True}), name) is True


def test_prune_head_no_is_refused_instead_of_pruning_the_head():
    with pytest.raises(ValueError, match="`prune_head` must be True or False; got 'no'"):
        PruningConfig(prune_head="no")
    data = {**PruningConfig().to_dict(), "prune_head": "no"}  # a hand-edited pruning_config.json
    with pytest.raises(ValueError, match="`prune_head`"):
        PruningConfig.from_dict(data)


@pytest.mark.parametrize("callback_class", [MagnitudePruningCallback, RPPCallback, HanPruningCallback],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("config", ["cubic", 0.5, ["oneshot"], object()], ids=["str", "float", "list", "object"])
def test_callback_with_a_config_of_the_wrong_type_is_a_value_error(callback_class, config):
    with pytest.raises(ValueError, match="`config` must be a") as error:
        callback_class(config)
    assert type(config).__name__ in str(error.value)


@pytest.mark.parametrize("callback_class, config", [(MagnitudePruningCallback, PruningConfig()),
                                                    (RPPCallback, RPPConfig()), (HanPruningCallback, HanConfig())],
                         ids=lambda c: type(c).__name__ if isinstance(c, PruningConfig) else c.__name__)
def test_callback_override_checkpoint_config_must_be_a_bool(callback_class, config):
    with pytest.raises(ValueError, match="`override_checkpoint_config` must be True or False; got 'yes'"):
        callback_class(config, override_checkpoint_config="yes")
    callback = callback_class(config, override_checkpoint_config=True)
    assert callback.override_checkpoint_config is True
    restored = callback_class(**callback.state()["args"])  # as the Trainer restores callbacks from a checkpoint
    assert restored.override_checkpoint_config is True and restored.config == config


@pytest.mark.parametrize("written, canonical", [
    (["neurons"], "neurons"), (("heads",), "heads"), (["heads", "neurons"], ["neurons", "heads"]),
    ("unstructured", "unstructured"),
])
def test_one_structure_has_one_spelling(written, canonical):
    # a resume compares the configs: the same structure written two ways must compare equal
    assert PruningConfig(structure=written).structure == canonical
    assert PruningConfig(structure=written) == PruningConfig(structure=canonical)
    config = PruningConfig()
    config.structure = written
    assert config.structure == canonical


def test_a_config_file_of_another_method_is_refused_by_a_subclass_and_a_bad_config_type_named(tmp_path):
    HanConfig(quality=0.7).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="The config is a HanConfig .*not a RPPConfig: load it with HanConfig"):
        RPPConfig.from_pretrained(tmp_path)
    assert PruningConfig.from_pretrained(tmp_path) == HanConfig(quality=0.7)
    for config_type in (["x"], {"a": 1}, "Nope"):
        with pytest.raises(ValueError, match="Unknown `config_type`"):
            PruningConfig.from_dict({"config_type": config_type})
