"""The `hf-prune` command line: `report` (table and heatmap) and `plot` (curves of a Trainer run)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import TinyClassificationDataset, tiny_bert
from transformers import EvalPrediction, Trainer, TrainingArguments

from hf_prune import MagnitudePruningCallback, PrunedModel, Pruner, PruningConfig
from hf_prune.cli import find_trainer_state, load_report, main
from hf_prune.constants import MASKS_NAME
from hf_prune.plots import plot_sparsity_heatmap, short_labels, sparsity_grid
from hf_prune.report import SparsityReport
from hf_prune.serialization import load_masks, read_masks_metadata, save_masks


mpimg = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str | os.PathLike, min_height: int = 200, min_width: int = 300) -> None:
    """`path` is a PNG of at least the given size that is not one flat colour."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_height and image.shape[1] >= min_width, image.shape
    assert image[..., :3].std() > 0.05


def total_line(text: str) -> str:
    return next(line for line in text.splitlines() if "total (targeted weights)" in line)


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A tiny BERT pruned to 60% and saved with `PrunedModel.save_pretrained`, and its masks."""
    model = tiny_bert()
    config = PruningConfig(final_sparsity=0.6, schedule="oneshot")
    pruner = Pruner(model, config)
    pruner.prune_to(0.6)
    folder = str(tmp_path_factory.mktemp("pruned"))
    PrunedModel(model, pruner.masks, config).save_pretrained(folder)
    return folder, pruner.masks


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The output_dir of a 6-step Trainer run with cubic pruning, evaluation every 2 steps, checkpoints at 3, 6."""
    output_dir = str(tmp_path_factory.mktemp("run"))
    args = TrainingArguments(output_dir=output_dir, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
                             logging_steps=1, eval_strategy="steps", eval_steps=2, save_steps=3,
                             save_only_model=True, report_to="none", use_cpu=True, disable_tqdm=True)
    callback = MagnitudePruningCallback(PruningConfig(final_sparsity=0.6, schedule="cubic", end_step=4,
                                                      pruning_frequency=1))

    def accuracy(prediction: EvalPrediction) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(),
            eval_dataset=TinyClassificationDataset(16, seed=1), compute_metrics=accuracy,
            callbacks=[callback]).train()
    return output_dir


# ---------------------------------------------------------------------------------------------------- report
def test_report_of_pruned_folder_prints_table_and_writes_heatmap(pruned_folder, tmp_path, capsys):
    folder, masks = pruned_folder
    png = tmp_path / "sparsity.png"
    assert main(["report", folder, "--png", str(png)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err.endswith(f"The sparsity of {folder} counted from its pruning_masks.safetensors.\n")
    for name in masks:
        assert name in out
    pruned = sum(int((~mask).sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    assert pruned / total == pytest.approx(0.6, abs=1e-3)
    assert total_line(out).split()[-1] == f"{pruned / total:.2%}"
    assert f"{total - pruned:,} / {total:,}" in total_line(out)
    assert_png(png, min_height=300, min_width=600)


def test_report_markdown(pruned_folder, capsys):
    assert main(["report", pruned_folder[0], "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| weight | shape | non-zero / total | sparsity |", "|---|---|---|---|"]
    assert lines[-1].startswith("| total (targeted weights) |") and lines[-1].endswith("| 60.00% |")


def test_report_of_plain_transformers_folder_reports_zeros(tmp_path, capsys):
    tiny_bert().save_pretrained(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err.endswith(f"The sparsity of {tmp_path} counted from its zero weights.\n")  # always said
    assert "bert.encoder.layer.1.output.dense.weight" in out
    assert total_line(out).split()[-1] == "0.00%"
    assert "No targeted weight is zero: a dense model. A model saved from PrunedModel.shrink() is one" in captured.err


def test_report_of_a_model_with_a_weight_without_entries(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=0)).save_pretrained(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.intermediate.dense.weight" in out and total_line(out).split()[-1] == "0.00%"


def test_sparsity_grid_has_a_row_per_layer_and_a_column_per_role(pruned_folder):
    folder, masks = pruned_folder
    report = PrunedModel.from_pretrained(folder).sparsity_report()
    rows, classes, values = sparsity_grid(report)
    assert rows == ["0", "1"]
    assert classes == list(report.by_class())
    by_name = {row.name: row.sparsity for row in report.layers}
    assert values[1, 0] == pytest.approx(by_name["bert.encoder.layer.1.attention.self.query.weight"])
    assert values[0, 5] == pytest.approx(by_name["bert.encoder.layer.0.output.dense.weight"])
    assert short_labels(classes)[:2] == ["attention.self.query", "attention.self.key"]


def test_short_labels_name_the_stack_of_encoder_decoder_models():
    t5 = ["encoder.block.*.layer.*.SelfAttention.q", "decoder.block.*.layer.*.EncDecAttention.q",
          "decoder.block.*.layer.*.DenseReluDense.wi", "lm_head"]
    assert short_labels(t5) == ["encoder: SelfAttention.q", "decoder: EncDecAttention.q",
                                "decoder: DenseReluDense.wi", "lm_head"]
    bart = ["model.encoder.layers.*.self_attn.q_proj", "model.decoder.layers.*.encoder_attn.q_proj"]
    assert short_labels(bart) == ["encoder: self_attn.q_proj", "decoder: encoder_attn.q_proj"]


@pytest.mark.parametrize("argv, message", [
    (["report", "{tmp}/missing"], "No such folder"),
    (["report", "{tmp}"], "neither pruning_masks.safetensors nor a transformers config.json"),
    (["report", "someone/some-model"], "Hub is unreachable"),
    (["plot", "{tmp}/missing"], "No such folder"),
    (["plot", "{tmp}"], "No trainer_state.json"),
    (["report", "{tmp}", "--png", "{tmp}/missing/x.png"], "--png {tmp}/missing/x.png: no such folder {tmp}/missing."),
    (["plot", "{tmp}", "--out", "{tmp}/missing/x.png"], "--out {tmp}/missing/x.png: no such folder {tmp}/missing."),
])
def test_errors_exit_2_with_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and err.startswith("hf-prune: error: ") and err.count("\n") == 1


def test_missing_matplotlib_is_a_clear_error(pruned_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    report = PrunedModel.from_pretrained(pruned_folder[0]).sparsity_report()
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_sparsity_heatmap(report, tmp_path / "x.png")
    assert main(["report", pruned_folder[0], "--png", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_import_does_not_need_matplotlib():
    code = "import sys, hf_prune, hf_prune.cli, hf_prune.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------------------------ plot
def test_plot_of_trainer_run(trainer_run, tmp_path):
    assert find_trainer_state(trainer_run) == os.path.join(trainer_run, "checkpoint-6", "trainer_state.json")
    assert main(["plot", trainer_run]) == 0
    assert_png(os.path.join(trainer_run, "pruning_curves.png"), min_height=600, min_width=700)
    assert main(["plot", trainer_run, "--metric", "accuracy", "--out", str(tmp_path / "accuracy.png")]) == 0
    assert_png(tmp_path / "accuracy.png", min_height=600, min_width=700)


def test_plot_of_a_speed_metric_named_explicitly(trainer_run, tmp_path):
    assert main(["plot", trainer_run, "--metric", "eval_runtime", "--out", str(tmp_path / "runtime.png")]) == 0
    assert_png(tmp_path / "runtime.png", min_height=600, min_width=700)  # "No eval_runtime in the logs", before


def test_plot_errors_on_unknown_metric_and_missing_sparsity(trainer_run, tmp_path, capsys):
    assert main(["plot", trainer_run, "--metric", "f1", "--out", str(tmp_path / "f1.png")]) == 2
    assert "No f1 in the logs; the logged eval metrics are eval_accuracy, eval_loss." in capsys.readouterr().err
    assert not (tmp_path / "f1.png").exists()
    state = {"log_history": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert main(["plot", str(tmp_path)]) == 2
    assert "No `sparsity` in the logs" in capsys.readouterr().err


# ----------------------------------------------------- malformed files, where output goes (issue 16, items 6, 7)
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hf-prune: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("shapes, field", [(None, "has no `shapes` entry"), ("[1]", "`shapes` must be a JSON object"),
                                           ('{"x.weight": [-3]}', "`shapes['x.weight']` must be a non-empty list"),
                                           ('{"x.weight": [0, 2]}', "`shapes['x.weight']` must be a non-empty list"),
                                           ('{"x.weight": [1.5]}', "`shapes['x.weight']` must be a non-empty list"),
                                           ("{not json", "header entry `shapes` is not JSON")])
def test_report_of_a_masks_file_with_a_bad_header_exits_2_with_one_line(tmp_path, capsys, shapes, field):
    from safetensors.torch import save_file

    header = {"format": "hf_prune.bitmask.v1", "metadata": "{}", **({"shapes": shapes} if shapes else {})}
    save_file({"x.weight": torch.zeros(1, dtype=torch.uint8)}, str(tmp_path / "pruning_masks.safetensors"), header)
    assert main(["report", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert f"{tmp_path / 'pruning_masks.safetensors'} is corrupt: " in err and field in err


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"),
                                           ("[1, 2]", "must hold a JSON object (the fields of a PruningConfig); got "
                                                      "a JSON list")])
def test_report_with_a_pruning_config_that_is_not_an_object_exits_2(pruned_folder, tmp_path, capsys, text, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(pruned_folder[0], folder)
    (folder / "pruning_config.json").write_text(text)
    assert main(["report", str(folder)]) == 2
    err = one_line_error(capsys)
    assert f"{folder / 'pruning_config.json'} " in err and message in err
    with pytest.raises(ValueError, match=f"{folder / 'pruning_config.json'} .*{message[:20]}"):
        PrunedModel.from_pretrained(folder)


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"), ('["log_history"]', "got a JSON list"),
                                           (b"\xff\xfe", "is not valid JSON")])
def test_plot_of_a_trainer_state_that_is_not_a_json_object_exits_2(tmp_path, capsys, text, message):
    state = tmp_path / "trainer_state.json"
    state.write_bytes(text) if isinstance(text, bytes) else state.write_text(text)
    assert main(["plot", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert f"{state} " in err and message in err


@pytest.mark.parametrize("log_history, message", [
    ([{"step": 1, "sparsity": 0.5}, "not an entry"], "`log_history` entry 1 must be a dict; got 'not an entry'"),
    ([{"sparsity": 0.5}], "`log_history` entry 0 must have an integer `step`; got None"),
    ([{"step": "1", "sparsity": 0.5}], "`log_history` entry 0 must have an integer `step`; got '1'"),
    ([{"step": 1, "sparsity": "half"}], "`sparsity` at step 1 of the `log_history` must be a number; got 'half'"),
])
def test_plot_of_a_malformed_log_history_exits_2_with_one_line(tmp_path, capsys, log_history, message):
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": log_history}))
    assert main(["plot", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert f"{state}: " in err and message in err
    assert not (tmp_path / "pruning_curves.png").exists()


def test_report_of_a_plain_folder_with_corrupt_weights_exits_2_with_one_line(tmp_path, capsys):
    tiny_bert().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b'{"not a header')
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path}: a weights file cannot be read (" in one_line_error(capsys)


def test_report_of_a_plain_folder_whose_config_gives_other_shapes_exits_2_with_one_line(tmp_path, capsys):
    tiny_bert().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2  # transformers raised a RuntimeError: a traceback
    err = capsys.readouterr().err  # after transformers' progress bar and load report
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        f"hf-prune: error: {tmp_path} does not load as BertForSequenceClassification: saved tensors of another "
        "shape than its config.json gives")


@pytest.mark.parametrize("pruned", [False, True])
def test_report_of_a_config_with_a_field_of_the_wrong_type_exits_2_with_one_line(tmp_path, capsys, pruned):
    model = tiny_bert()
    if pruned:
        config = PruningConfig(final_sparsity=0.5, schedule="oneshot")
        pruner = Pruner(model, config)
        pruner.prune_to(0.5)
        PrunedModel(model, pruner.masks, config).save_pretrained(tmp_path)
    else:
        model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": "abc"}))
    capsys.readouterr()
    if pruned:  # the masks are reported, unchecked against a model that cannot be built
        assert main(["report", str(tmp_path)]) == 0
        assert "total (targeted weights)" in capsys.readouterr().out
    else:  # transformers' StrictDataclassFieldValidationError is no ValueError: it was a traceback
        assert main(["report", str(tmp_path)]) == 2
        assert f"{tmp_path}: its config does not pass transformers' checks (Validation error for field " \
               "'hidden_size'" in one_line_error(capsys)


@pytest.mark.parametrize("argv, message", [
    (["report", "{folder}", "--png", ""], "--png '': give the name of the PNG file to write."),
    (["plot", "{run}", "--out", ""], "--out '': give the name of the PNG file to write."),
    (["plot", "{run}", "--out", "{run}"], "--out {run}: Cannot write {run}: it is a directory"),
])
def test_an_empty_or_unwritable_output_name_is_refused_before_any_work(pruned_folder, trainer_run, argv, message,
                                                                      capsys):
    names = {"folder": pruned_folder[0], "run": trainer_run}
    before = sorted(os.listdir(trainer_run))
    assert main([arg.format(**names) for arg in argv]) == 2  # "" wrote nothing (report) or the default (plot)
    assert message.format(**names) in one_line_error(capsys)
    assert sorted(os.listdir(trainer_run)) == before


def test_report_png_writes_through_a_symlink_and_refuses_what_is_not_a_file(pruned_folder, tmp_path, capsys):
    target = tmp_path / "real.png"
    (tmp_path / "link.png").symlink_to(target)
    assert main(["report", pruned_folder[0], "--png", str(tmp_path / "link.png")]) == 0
    assert (tmp_path / "link.png").is_symlink() and target.read_bytes().startswith(PNG_SIGNATURE)
    capsys.readouterr()
    os.mkfifo(tmp_path / "pipe")
    for path, kind in ((tmp_path / "pipe", "a named pipe"), (tmp_path, "a directory"),
                       ("/dev/full", "a character device")):
        if not os.path.exists(path):
            continue
        assert main(["report", pruned_folder[0], "--png", str(path)]) == 2
        assert f"it is {kind}; hf_prune writes regular files only" in one_line_error(capsys)
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)


def test_report_of_a_deep_folder(tmp_path, capsys):
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.9, schedule="oneshot"))
    pruner.update(0)
    PrunedModel(model, pruner.masks, pruner.config).save_pretrained(tmp_path, compression="deep")
    assert main(["report", str(tmp_path)]) == 0
    assert total_line(capsys.readouterr().out).split()[-1] == "90.00%"


def test_report_of_a_checkpoint_uses_the_config_in_its_masks_metadata(trainer_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-6"
    shutil.copytree(os.path.join(trainer_run, "checkpoint-6"), checkpoint)
    masks_file = checkpoint / MASKS_NAME
    metadata = read_masks_metadata(masks_file)
    masks = load_masks(masks_file)
    config = {**metadata["pruning_config"], "class_granularity": "tensor"}
    save_masks(masks, masks_file, {**metadata, "pruning_config": config})
    report, source = load_report(str(checkpoint))
    assert source == MASKS_NAME
    assert sorted(report.by_class()) == sorted(SparsityReport.from_masks(masks, "tensor").by_class())
    assert len(report.by_class()) == len(masks)  # one class per weight, not the 6 roles
