import json

import pytest

from hf_prune import PruningConfig
from hf_prune.constants import CONFIG_NAME


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
        ({"target_modules": "("}, "target_modules"),
        ({"exclude_modules": []}, "exclude_modules"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        PruningConfig(**kwargs)
