#!/usr/bin/env python
"""Fine-tune a model for extractive question answering (SQuAD v1.1) while pruning it with hf_prune.

Modelled on transformers' `examples/pytorch/question-answering/run_qa.py`, with the same option names plus
`PruningArguments`. Data come from the Hub (`--dataset_name rajpurkar/squad`, online) or from SQuAD v1.1 JSON
files; `--train_articles N` splits a single file (such as `dev-v1.1.json` when it is all there is) by article: the
first N articles train, the rest evaluate. Long contexts are split into windows (`--doc_stride`); answers are
the best span over the windows (`--n_best_size`, `--max_answer_length`), scored with SQuAD's exact match / F1.

```bash
python examples/run_squad.py --model_name_or_path <model> --train_file ../shared/data/squad/dev-v1.1.json \\
    --train_articles 38 --do_train --do_eval --final_sparsity 0.5 --output_dir out/squad
```
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from transformers import (
    AutoModelForQuestionAnswering,
    BatchEncoding,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    set_seed,
)
from utils_qa import QuestionAnsweringTrainer
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

COLUMNS = ("id", "title", "context", "question", "answers")


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on, how to window it and how to read answers off the logits."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset in SQuAD's format, e.g. "
                                                                      "rajpurkar/squad (needs the Hub)."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a SQuAD v1.1 .json file."})
    validation_file: str | None = field(default=None,
                                        metadata={"help": "Validation data: a SQuAD v1.1 .json file."})
    train_articles: int | None = field(default=None, metadata={
        "help": "Split one file by article: the first N articles of --train_file (or --validation_file) train, "
                "the others evaluate."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens shared by consecutive windows of a context."})
    n_best_size: int = field(default=20, metadata={"help": "Start and end candidates per window."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training "
                                                                           "questions (and their first N windows)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N validation "
                                                                          "questions."})

    def __post_init__(self) -> None:
        check_int("train_articles", self.train_articles, 1, optional=True)
        check_int("max_seq_length", self.max_seq_length, 1)
        check_int("doc_stride", self.doc_stride, 0)
        check_int("n_best_size", self.n_best_size, 1)
        check_int("max_answer_length", self.max_answer_length, 1)
        check_int("max_train_samples", self.max_train_samples, 1, optional=True)
        check_int("max_eval_samples", self.max_eval_samples, 1, optional=True)


# ------------------------------------------------------------------------------------------------------ data
def read_squad_articles(option: str, path: str) -> list[Any]:
    """The `data` list (articles) of a SQuAD v1.1 JSON file (UTF-8, with or without a byte-order mark)."""
    check_file(option, path, (".json",))
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--{option} {path} is not valid JSON: {err}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list) or not data["data"]:
        raise InputError(f"--{option} {path} is not SQuAD v1.1 JSON: it needs a non-empty top-level 'data' list "
                         "of articles.")
    return data["data"]


def flatten(option: str, path: str, articles: Sequence[Any], max_samples: int | None) -> datasets.Dataset:
    """One row per question (the Hub's `squad` columns), the first `max_samples` of them."""
    rows = {name: [] for name in COLUMNS}
    for number, article in enumerate(articles):
        try:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = {"text": [str(a["text"]) for a in qa["answers"]],
                               "answer_start": [int(a["answer_start"]) for a in qa["answers"]]}
                    if not answers["text"]:
                        raise InputError(f"--{option} {path}: question {qa['id']} has no answer (SQuAD v2's "
                                         "unanswerable questions are not supported).")
                    row = {"id": str(qa["id"]), "title": str(article.get("title", "")),
                           "context": str(paragraph["context"]), "question": str(qa["question"]), "answers": answers}
                    for name in COLUMNS:
                        rows[name].append(row[name])
        except (KeyError, TypeError, ValueError) as err:
            problem = f"missing {err}" if isinstance(err, KeyError) else str(err)
            raise InputError(f"--{option} {path}: article {number} is not in SQuAD v1.1 form ({problem}).") from None
    return first_rows(datasets.Dataset.from_dict(rows), max_samples)


def load_splits(data_args: DataTrainingArguments, cache_dir: str | None) -> dict[str, datasets.Dataset]:
    """The `train` / `validation` questions, from the Hub, from files, or one file split by `--train_articles`."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if data_args.train_articles is not None:
        return split_by_article(data_args, limits)
    if all(path is None for path in files.values()):
        if data_args.dataset_name is None:
            raise InputError("no data: pass --train_file / --validation_file (SQuAD v1.1 JSON) or --dataset_name.")
        return load_hub_splits(data_args.dataset_name, limits, cache_dir)
    return {split: flatten(f"{split}_file", path, read_squad_articles(f"{split}_file", path), limits[split])
            for split, path in files.items() if path is not None}


def split_by_article(data_args: DataTrainingArguments, limits: dict[str, int | None]) -> dict[str, datasets.Dataset]:
    """Train on the first `--train_articles` articles of one file and evaluate on the others."""
    paths = {path for path in (data_args.train_file, data_args.validation_file) if path is not None}
    if len(paths) != 1:
        raise InputError("--train_articles splits one SQuAD file: pass it as --train_file (and --validation_file "
                         f"only if it is the same file); got {len(paths)} files.")
    option = "train_file" if data_args.train_file else "validation_file"
    path = paths.pop()
    articles = read_squad_articles(option, path)
    count = data_args.train_articles
    if not 0 < count < len(articles):
        raise InputError(f"--train_articles must be in 1..{len(articles) - 1} for {path}, which has {len(articles)} "
                         f"articles; got {count}.")
    logger.info("Splitting %s by article: the first %d train, the last %d evaluate.", path, count,
                len(articles) - count)
    return {"train": flatten(option, path, articles[:count], limits["train"]),
            "validation": flatten(option, path, articles[count:], limits["validation"])}


def load_hub_splits(name: str, limits: dict[str, int | None], cache_dir: str | None) -> dict[str, datasets.Dataset]:
    """The train and validation splits of a Hub dataset in SQuAD's format (needs the Hub)."""
    raw = load_hub_dataset(name, None, cache_dir)
    missing = [column for column in COLUMNS if column not in next(iter(raw.values())).column_names]
    if missing:
        raise InputError(f"--dataset_name {name} lacks the columns {', '.join(missing)} of SQuAD's format.")
    return {split: first_rows(raw[split], limit).select_columns(COLUMNS)
            for split, limit in limits.items() if split in raw}


# ------------------------------------------------------------------------------------------------- features
class FeatureBuilder:
    """Tokenizes questions with their contexts into overlapping windows, as transformers' run_qa.py does.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a fast tokenizer (offsets are needed).
        max_seq_length (`int`), doc_stride (`int`): window length and overlap, in tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, doc_stride: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.doc_stride = doc_stride
        self.question_first = tokenizer.padding_side == "right"
        self.context_index = 1 if self.question_first else 0

    @staticmethod
    def _questions(examples: dict[str, list]) -> list[str]:
        return [question.lstrip() for question in examples["question"]]  # some SQuAD questions start with spaces

    def check_room_for_context(self, split: datasets.Dataset, name: str) -> None:
        """Each window holds the question, the special tokens and a slice of context longer than `doc_stride` (the
        tokenizers library panics otherwise, an error that is no `Exception`)."""
        ids = self.tokenizer(self._questions(split), add_special_tokens=False)["input_ids"]
        longest = max((len(question) for question in ids), default=0)
        room = self.max_seq_length - longest - self.tokenizer.num_special_tokens_to_add(pair=True)
        if self.doc_stride >= room:
            raise InputError(f"--max_seq_length {self.max_seq_length} leaves {max(room, 0)} tokens of context beside "
                             f"the longest {name} question ({longest} tokens) and the special tokens, not more than "
                             f"--doc_stride ({self.doc_stride}); raise --max_seq_length or lower --doc_stride.")

    def _windows(self, examples: dict[str, list]) -> tuple[BatchEncoding, list[int]]:
        questions = self._questions(examples)
        pair = (questions, examples["context"]) if self.question_first else (examples["context"], questions)
        encoding = self.tokenizer(*pair, truncation="only_second" if self.question_first else "only_first",
                                  max_length=self.max_seq_length, stride=self.doc_stride,
                                  return_overflowing_tokens=True, return_offsets_mapping=True)
        return encoding, encoding.pop("overflow_to_sample_mapping")

    def train(self, examples: dict[str, list]) -> BatchEncoding:
        """Windows labelled with the answer's token span, or the CLS token where the answer is not inside."""
        encoding, sample_of = self._windows(examples)
        encoding["start_positions"], encoding["end_positions"] = [], []
        for i, offsets in enumerate(encoding.pop("offset_mapping")):
            input_ids = encoding["input_ids"][i]
            cls_index = input_ids.index(self.tokenizer.cls_token_id) if self.tokenizer.cls_token_id in input_ids else 0
            sequence_ids = encoding.sequence_ids(i)
            answers = examples["answers"][sample_of[i]]
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            first = sequence_ids.index(self.context_index)
            last = len(sequence_ids) - 1 - sequence_ids[::-1].index(self.context_index)
            if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
                start, end = cls_index, cls_index
            else:
                while first < len(offsets) and offsets[first][0] <= start_char:
                    first += 1
                while offsets[last][1] >= end_char:
                    last -= 1
                start, end = first - 1, last + 1
            encoding["start_positions"].append(start)
            encoding["end_positions"].append(end)
        return encoding

    def evaluation(self, examples: dict[str, list]) -> BatchEncoding:
        """Windows with their example's id and the character offsets of their context tokens (`None` elsewhere)."""
        encoding, sample_of = self._windows(examples)
        encoding["example_id"] = [examples["id"][sample] for sample in sample_of]
        encoding["offset_mapping"] = [
            [offset if sequence_id == self.context_index else None
             for offset, sequence_id in zip(offsets, encoding.sequence_ids(i))]
            for i, offsets in enumerate(encoding["offset_mapping"])]
        return encoding


def build_features(splits: dict[str, datasets.Dataset], tokenizer: PreTrainedTokenizerBase,
                   data_args: DataTrainingArguments) -> dict[str, datasets.Dataset]:
    """Each split's windows: labelled for `train` (at most `--max_train_samples`), with offsets for `validation`."""
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    if data_args.doc_stride >= max_seq_length:
        raise InputError(f"--doc_stride ({data_args.doc_stride}) must be smaller than --max_seq_length "
                         f"({max_seq_length}).")
    if not tokenizer.is_fast:
        raise InputError(f"{type(tokenizer).__name__} is not a fast tokenizer; the character offsets of answers "
                         "need one (pass --tokenizer_name with a fast tokenizer).")
    builder = FeatureBuilder(tokenizer, max_seq_length, data_args.doc_stride)
    features = {}
    for split, function in (("train", builder.train), ("validation", builder.evaluation)):
        if split in splits:
            builder.check_room_for_context(splits[split], split)
            features[split] = splits[split].map(function, batched=True, remove_columns=list(COLUMNS),
                                                 desc=f"Tokenizing {split}")
    if "train" in features:
        features["train"] = first_rows(features["train"], data_args.max_train_samples)
    return features


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the script with `argv` (default: `sys.argv[1:]`) and returns its metrics; bad input exits with code 2."""
    with exit_on_input_error("run_squad.py"):
        args: ScriptArguments = parse_args("run_squad.py", DataTrainingArguments, argv)
        model_args, data_args, training_args = args.model, args.data, args.training
        setup_logging(training_args, __name__)
        splits = load_splits(data_args, model_args.cache_dir)
        require_splits(training_args, splits.get("train"), splits.get("validation"))
        tokenizer = load_tokenizer(model_args)
        features = build_features(splits, tokenizer, data_args)
        callbacks = pruning_callbacks(args, len(features.get("train", ())))
        config = load_model_config(model_args)

    set_seed(training_args.seed)
    model = AutoModelForQuestionAnswering.from_pretrained(model_args.model_name_or_path, config=config,
                                                          **model_args.hub_kwargs())
    trainer = QuestionAnsweringTrainer(
        model=model,
        args=training_args,
        train_dataset=features.get("train") if training_args.do_train else None,
        eval_dataset=features.get("validation") if training_args.do_eval else None,
        eval_examples=splits.get("validation"),
        n_best_size=data_args.n_best_size,
        max_answer_length=data_args.max_answer_length,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None),
        callbacks=callbacks,
    )
    with exit_on_input_error("run_squad.py"):  # the pruning checks that need the model (see pruning_callbacks)
        return train_evaluate_save(trainer, tokenizer, args, len(splits.get("train", ())),
                                   len(splits.get("validation", ())))


if __name__ == "__main__":
    main(sys.argv[1:])
