#!/usr/bin/env python
"""Fine-tune a model on a GLUE task (single sentences or sentence pairs) while pruning it with hf_prune.

Modelled on transformers' `examples/pytorch/text-classification/run_glue.py`, with the same option names plus
`PruningArguments` (`--final_sparsity`, `--schedule`, ...). Data come from the Hub (`--task_name`, online) or
from local files (`--train_file` / `--validation_file`): GLUE's TSV files as distributed (CoLA's header-less
layout included) or CSV files. Metrics are computed offline: accuracy, F1 (MRPC, QQP), Matthews correlation
(CoLA), Pearson / Spearman (STS-B). The pruned model is saved with `PrunedModel.save_pretrained`.

```bash
python examples/run_glue.py --model_name_or_path <model> --task_name sst2 \\
    --train_file ../shared/data/sst2/train.tsv --validation_file ../shared/data/sst2/dev.tsv \\
    --do_train --do_eval --final_sparsity 0.5 --output_dir out/sst2
```
"""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
from scipy import stats
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    set_seed,
)
from utils_run import (
    InputError,
    ScriptArguments,
    check_file,
    exit_on_input_error,
    first_rows,
    load_hub_dataset,
    load_model_config,
    load_tokenizer,
    parse_args,
    pruning_callbacks,
    require_splits,
    setup_logging,
    train_evaluate_save,
)

from hf_prune.validation import check_int


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    """A GLUE task: its text columns and label names (`None`: regression) on the Hub, its metrics, and the
    column names of its TSV files as distributed where they differ from the Hub's."""

    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...] = ("accuracy",)
    tsv_columns: Mapping[str, str] = field(default_factory=dict)


GLUE_TASKS = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                     tsv_columns={"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                     {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment")),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                    {"label": "is_duplicate"}),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "sst2": GlueTask(("sentence",), ("negative", "positive")),
    "stsb": GlueTask(("sentence1", "sentence2"), None, ("pearson", "spearmanr"), {"label": "score"}),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment")),
}
#: CoLA's TSV files have no header; these are its four columns.
COLA_COLUMNS = ("source", "label", "orig_mark", "sentence")
SUFFIXES = (".tsv", ".csv")


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on, and how to tokenize it."""

    task_name: str | None = field(default=None, metadata={"help": "The GLUE task: its columns, labels and "
                                                                   "metrics (and its data, when no files are given).",
                                                           "choices": tuple(GLUE_TASKS)})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a GLUE .tsv or a .csv file."})
    validation_file: str | None = field(default=None,
                                        metadata={"help": "Validation data: a GLUE .tsv or a .csv file."})
    text_column_names: str | None = field(default=None, metadata={
        "help": "Comma-separated text columns (one, or two for pairs). Default: the task's, else `sentence1,sentence2`"
                " or `sentence`, whichever the file has."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: `label`, or the "
                                                                         "task's column in GLUE's TSV files)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N validation rows."})

    def __post_init__(self) -> None:
        check_int("max_seq_length", self.max_seq_length, 1)
        check_int("max_train_samples", self.max_train_samples, 1, optional=True)
        check_int("max_eval_samples", self.max_eval_samples, 1, optional=True)


# ------------------------------------------------------------------------------------------------------ data
def read_table(option: str, path: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a GLUE TSV or a CSV file; CoLA's header-less four-column layout gets `COLA_COLUMNS`.

    The file is UTF-8, with or without a byte-order mark (GLUE's MRPC files begin with one)."""
    check_file(option, path, SUFFIXES)
    delimiter, quoting = ("\t", csv.QUOTE_NONE) if path.endswith(".tsv") else (",", csv.QUOTE_MINIMAL)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"--{option} {path} is not a readable {path[-3:].upper()} file: {err}.") from None
    if not rows:
        raise InputError(f"--{option} {path} is empty.")
    first = rows[0]
    header, body, first_line = (list(COLA_COLUMNS), rows, 1) if len(first) == 4 and first[1] in ("0", "1") \
        else (first, rows[1:], 2)
    for line, row in enumerate(body, start=first_line):
        if len(row) != len(header):
            raise InputError(f"--{option} {path}: line {line} has {len(row)} fields where the header has "
                             f"{len(header)} ({', '.join(header)}).")
    if not body:
        raise InputError(f"--{option} {path} has a header but no rows.")
    return header, body


def column_names(data_args: DataTrainingArguments, task: GlueTask | None, header: Sequence[str]) -> dict[str, str]:
    """Output name -> column to read: the text columns, then `"label"`, from the arguments, the task or the file."""
    if data_args.text_column_names:
        text = [name.strip() for name in data_args.text_column_names.split(",")]
        if not 1 <= len(text) <= 2:
            raise InputError(f"--text_column_names takes one or two columns; got {data_args.text_column_names!r}.")
    elif task is not None:
        text = list(task.text_columns)
    else:
        text = ["sentence1", "sentence2"] if "sentence1" in header else ["sentence"]
    return {**{name: name for name in text}, "label": data_args.label_column_name or "label"}


def read_glue_file(option: str, path: str, data_args: DataTrainingArguments, task: GlueTask | None,
                   max_samples: int | None) -> dict[str, list[str]]:
    """The text columns and `label` (as strings) of the first `max_samples` rows of a file; a task's columns are
    also found under the names GLUE's TSV files give them (`#1 String`, `Quality`, ...)."""
    header, body = read_table(option, path)
    columns = {}
    for key, name in column_names(data_args, task, header).items():
        alias = task.tsv_columns.get(name) if task is not None else None
        found = name if name in header else alias if alias in header else None
        if found is None:
            wanted = repr(name) + (f" (or {alias!r})" if alias else "")
            raise InputError(f"--{option} {path} has no column {wanted}; its columns are {', '.join(header)}. "
                             "Set --task_name, --text_column_names or --label_column_name to match.")
        index = header.index(found)
        columns[key] = [row[index] for row in body[:max_samples]]
    return columns


def encode_label(value: str, label_names: Sequence[str] | None) -> int | float | None:
    """A label string as a class id (a name in `label_names`, or its index) or, with no `label_names`, a float;
    `None` when it is neither."""
    if label_names is None:
        try:
            return float(value)
        except ValueError:
            return None
    if value in label_names:
        return label_names.index(value)
    return int(value) if value.isdigit() and int(value) < len(label_names) else None


def encode_labels(option: str, values: Sequence[str], label_names: Sequence[str] | None) -> list[int | float]:
    """`encode_label` of every value; `InputError` naming the first one that is not a valid label."""
    encoded = [encode_label(value, label_names) for value in values]
    if None in encoded:
        row = encoded.index(None)
        accepted = ("a number" if label_names is None
                    else f"one of {', '.join(label_names)} or 0..{len(label_names) - 1}")
        raise InputError(f"--{option}: the label {values[row]!r} of data row {row + 1} is not {accepted}.")
    return encoded


def infer_label_names(values: Sequence[str]) -> tuple[str, ...] | None:
    """Without a task: `None` (regression) when every label is a number and some are not integers, else the
    sorted distinct labels (as transformers' run_glue.py does)."""
    try:
        numbers = [float(value) for value in values]
    except ValueError:
        return tuple(sorted(set(values)))
    return None if any(not n.is_integer() for n in numbers) else tuple(sorted(set(values), key=float))


def load_splits(data_args: DataTrainingArguments, cache_dir: str | None
                ) -> tuple[dict[str, datasets.Dataset], tuple[str, ...] | None, tuple[str, ...]]:
    """The `train` / `validation` splits (text columns and an encoded `label`), the label names (`None`:
    regression) and the text columns."""
    task = GLUE_TASKS[data_args.task_name] if data_args.task_name else None
    files = {"train": (data_args.train_file, data_args.max_train_samples, "train_file"),
             "validation": (data_args.validation_file, data_args.max_eval_samples, "validation_file")}
    if data_args.train_file is None and data_args.validation_file is None:
        if task is None:
            raise InputError("no data: pass --task_name (GLUE from the Hub) or --train_file / --validation_file.")
        return load_hub_splits(data_args, task, cache_dir), task.label_names, task.text_columns
    raw = {split: read_glue_file(option, path, data_args, task, limit)
           for split, (path, limit, option) in files.items() if path is not None}
    reference = raw.get("train", raw.get("validation"))
    label_names = task.label_names if task is not None else infer_label_names(reference["label"])
    splits = {}
    for split, columns in raw.items():
        columns["label"] = encode_labels(files[split][2], columns["label"], label_names)
        splits[split] = datasets.Dataset.from_dict(columns)
    text_columns = tuple(name for name in reference if name != "label")
    return splits, label_names, text_columns


def describe_labels(label_names: Sequence[str] | None) -> str:
    """`"2 labels (negative, positive)"`, or for regression (`None`) `"1 output (regression)"`."""
    if label_names is None:
        return "1 output (regression)"
    return f"{len(label_names)} labels ({', '.join(label_names)})"


def match_model_labels(model_config: PretrainedConfig, model_name: str, splits: dict[str, datasets.Dataset],
                       label_names: tuple[str, ...] | None
                       ) -> tuple[dict[str, datasets.Dataset], tuple[str, ...] | None]:
    """The splits and label names to fine-tune the model of `model_config` with.

    A model without a sequence-classification head gets a new head for the data's labels. A model with one (a
    classifier already fine-tuned) keeps it, so it must have been trained for the data's labels: as many of them
    (one output for regression) and, where its labels have names (not `LABEL_0`, ...), the same names, compared
    without case. Names in another order are matched by renumbering the data's class ids to the model's.

    Raises:
        InputError: when the model's head was trained for another label set.
    """
    if not any(name.endswith("ForSequenceClassification") for name in model_config.architectures or ()):
        return splits, label_names
    count = model_config.num_labels
    model_names = None if count == 1 else tuple(str(model_config.id2label.get(i, f"LABEL_{i}"))
                                                 for i in range(count))
    mismatch = InputError(f"--model_name_or_path {model_name} has a sequence-classification head for "
                          f"{describe_labels(model_names)}, but the data has {describe_labels(label_names)}; "
                          "fine-tune its base model instead, or data with the labels of its head.")
    if (model_names is None) != (label_names is None) or (label_names is not None and count != len(label_names)):
        raise mismatch
    if model_names is None or model_names == tuple(f"LABEL_{i}" for i in range(count)):
        return splits, label_names  # nothing to compare: the head's classes are taken in the data's order
    model_keys, data_keys = [name.lower() for name in model_names], [name.lower() for name in label_names]
    if model_keys == data_keys:
        return splits, label_names
    if sorted(model_keys) != sorted(data_keys) or len(set(model_keys)) != count:
        raise mismatch
    position = [model_keys.index(key) for key in data_keys]  # the data's class id -> the model's
    logger.info("Renumbering the labels to the order of the model's head: %s.", ", ".join(model_names))
    renumbered = {split: dataset.map(lambda batch: {"label": [position[i] for i in batch["label"]]}, batched=True,
                                     desc=f"Renumbering the labels of {split}")
                  for split, dataset in splits.items()}
    return renumbered, tuple(label_names[data_keys.index(key)] for key in model_keys)


def load_hub_splits(data_args: DataTrainingArguments, task: GlueTask,
                    cache_dir: str | None) -> dict[str, datasets.Dataset]:
    """`nyu-mll/glue`'s train and validation splits of the task (needs the Hub)."""
    raw = load_hub_dataset("nyu-mll/glue", data_args.task_name, cache_dir)
    validation = "validation_matched" if data_args.task_name == "mnli" else "validation"
    limits = {"train": data_args.max_train_samples, validation: data_args.max_eval_samples}
    return {"validation" if split == validation else split:
            first_rows(raw[split], limit).select_columns([*task.text_columns, "label"])
            for split, limit in limits.items()}


# --------------------------------------------------------------------------------------------------- metrics
def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (Gorodkin's multi-class form, as scikit-learn computes it); 0 when undefined."""
    classes = np.union1d(predictions, labels)
    confusion = np.array([[np.sum((labels == t) & (predictions == p)) for p in classes] for t in classes],
                         dtype=np.float64)
    n, correct = confusion.sum(), np.trace(confusion)
    true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = np.sqrt((n * n - pred_sum @ pred_sum) * (n * n - true_sum @ true_sum))
    return float((correct * n - true_sum @ pred_sum) / denominator) if denominator else 0.0


def binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1."""
    true_positives = np.sum((predictions == 1) & (labels == 1))
    denominator = np.sum(predictions == 1) + np.sum(labels == 1)
    return float(2 * true_positives / denominator) if denominator else 0.0


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda predictions, labels: float(np.mean(predictions == labels)),
    "f1": binary_f1,
    "matthews_correlation": matthews_correlation,
    "pearson": lambda predictions, labels: float(stats.pearsonr(predictions, labels)[0]),
    "spearmanr": lambda predictions, labels: float(stats.spearmanr(predictions, labels)[0]),
    "mse": lambda predictions, labels: float(np.mean((predictions - labels) ** 2)),
}


def metrics_function(names: Sequence[str], is_regression: bool) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for the Trainer: logits -> class ids (or scores) -> the named metrics."""
    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)
        return {name: METRICS[name](predictions, prediction.label_ids) for name in names}

    return compute_metrics


# ------------------------------------------------------------------------------------------------------ main
def tokenize(splits: Mapping[str, datasets.Dataset], tokenizer: PreTrainedTokenizerBase, text_columns: Sequence[str],
             max_seq_length: int) -> dict[str, datasets.Dataset]:
    """Each split tokenized (unpadded: the collator pads each batch), the text columns dropped, `label` kept."""
    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(*(batch[name] for name in text_columns), max_length=max_seq_length, truncation=True)

    return {split: dataset.map(encode, batched=True, remove_columns=list(text_columns), desc=f"Tokenizing {split}")
            for split, dataset in splits.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the script with `argv` (default: `sys.argv[1:]`) and returns its metrics; bad input exits with code 2."""
    with exit_on_input_error("run_glue.py"):
        args: ScriptArguments = parse_args("run_glue.py", DataTrainingArguments, argv)
        model_args, data_args, training_args = args.model, args.data, args.training
        setup_logging(training_args, __name__)
        splits, label_names, text_columns = load_splits(data_args, model_args.cache_dir)
        require_splits(training_args, splits.get("train"), splits.get("validation"))
        tokenizer = load_tokenizer(model_args)
        config = load_model_config(model_args)
        splits, label_names = match_model_labels(config, model_args.model_name_or_path, splits, label_names)
        if data_args.max_seq_length > tokenizer.model_max_length:
            logger.warning("--max_seq_length %d is longer than the model's maximum, %d; using that.",
                           data_args.max_seq_length, tokenizer.model_max_length)
        features = tokenize(splits, tokenizer, text_columns, min(data_args.max_seq_length, tokenizer.model_max_length))
        callbacks = pruning_callbacks(args, len(features.get("train", ())))

    set_seed(training_args.seed)
    is_regression = label_names is None
    config.num_labels = 1 if is_regression else len(label_names)
    config.finetuning_task = data_args.task_name
    if not is_regression:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config,
                                                               **model_args.hub_kwargs())
    task = GLUE_TASKS.get(data_args.task_name)
    metric_names = task.metrics if task is not None else ("mse",) if is_regression else ("accuracy",)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=features.get("train") if training_args.do_train else None,
        eval_dataset=features.get("validation") if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None),
        compute_metrics=metrics_function(metric_names, is_regression),
        callbacks=callbacks,
    )
    with exit_on_input_error("run_glue.py"):  # the pruning checks that need the model (see pruning_callbacks)
        return train_evaluate_save(trainer, tokenizer, args, len(features.get("train", ())),
                                   len(features.get("validation", ())))


if __name__ == "__main__":
    main(sys.argv[1:])
