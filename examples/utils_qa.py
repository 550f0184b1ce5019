"""Extractive question answering for `run_squad.py`: logits -> answer texts, SQuAD's metrics, and a Trainer that
reports them (after transformers' `examples/pytorch/question-answering/utils_qa.py` and `trainer_qa.py`)."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import datasets
import numpy as np
from transformers import Trainer


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ------------------------------------------------------------------------------------------- post-processing
def postprocess_qa_predictions(examples: datasets.Dataset, features: datasets.Dataset,
                               predictions: tuple[np.ndarray, np.ndarray], n_best_size: int = 20,
                               max_answer_length: int = 30) -> dict[str, str]:
    """The best answer text of each example, from the start / end logits of its features (one per window).

    For every feature the `n_best_size` highest start and end logits are paired; spans outside the context
    (offset `None`, or padding: logits beyond the feature's length), reversed or longer than `max_answer_length`
    tokens are dropped, and the span with the highest start + end logit over all features of the example wins.

    Args:
        examples (`datasets.Dataset`): with `id` and `context` columns.
        features (`datasets.Dataset`): with `example_id` and `offset_mapping` (character spans of the context
            tokens, `None` elsewhere) columns.
        predictions (`tuple[np.ndarray, np.ndarray]`): start and end logits, `(num_features, seq_len)` each (rows
            padded with any value past each feature's length).

    Returns:
        `dict[str, str]`: example id -> answer text (`""` when no span is valid).
    """
    start_logits, end_logits = predictions
    if len(start_logits) != len(features):
        raise ValueError(f"Got logits for {len(start_logits)} features, expected {len(features)}.")
    features_of = collections.defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        features_of[example_id].append(index)
    offset_mapping = features["offset_mapping"]
    answers = {}
    for example_id, context in zip(examples["id"], examples["context"]):
        best_score, best_text = -np.inf, ""
        for index in features_of[example_id]:
            offsets, starts, ends = offset_mapping[index], start_logits[index], end_logits[index]
            for start in np.argsort(starts)[::-1][:n_best_size]:
                for end in np.argsort(ends)[::-1][:n_best_size]:
                    if (end >= len(offsets) or start > end or end - start + 1 > max_answer_length
                            or offsets[start] is None or offsets[end] is None):
                        continue
                    score = starts[start] + ends[end]
                    if score > best_score:
                        best_score, best_text = score, context[offsets[start][0]:offsets[end][1]]
        answers[example_id] = best_text
    return answers


# ---------------------------------------------------------------------------------------------------- metrics
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 of two normalised answers."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1's `exact_match` and `f1` (percentages), each the best over an example's reference answers.

    Args:
        predictions (`Mapping[str, str]`): example id -> predicted answer.
        references (`Mapping[str, Sequence[str]]`): example id -> its reference answers (at least one each).
    """
    if set(predictions) != set(references):
        raise ValueError(f"Predictions for {len(predictions)} examples, references for {len(references)}: the ids "
                         "must be the same.")
    exact = [max(float(normalize_answer(predictions[i]) == normalize_answer(r)) for r in refs)
             for i, refs in references.items()]
    f1 = [max(answer_f1(predictions[i], r) for r in refs) for i, refs in references.items()]
    return {"exact_match": 100.0 * float(np.mean(exact)), "f1": 100.0 * float(np.mean(f1))}


# ---------------------------------------------------------------------------------------------------- trainer
class QuestionAnsweringTrainer(Trainer):
    """A `Trainer` whose `evaluate` post-processes the start / end logits into answers and adds SQuAD's
    `exact_match` and `f1` to the metrics (so mid-training evaluations report them too).

    Args:
        eval_examples (`datasets.Dataset`): the examples (`id`, `context`, `answers`) behind `eval_dataset`'s
            features.
        n_best_size (`int`, *optional*, defaults to 20), max_answer_length (`int`, *optional*, defaults to 30):
            see `postprocess_qa_predictions`.
        args, kwargs: those of `Trainer`.
    """

    def __init__(self, *args, eval_examples: datasets.Dataset | None = None, n_best_size: int = 20,
                 max_answer_length: int = 30, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length

    def evaluate(self, eval_dataset: datasets.Dataset | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluates the features of `eval_examples` (`eval_dataset`, default: the Trainer's)."""
        features = self.eval_dataset if eval_dataset is None else eval_dataset
        # the model gets the windows without their bookkeeping (which the collator cannot batch, and which
        # remove_unused_columns=False would leave in); postprocessing reads it from `features`
        inputs = features.remove_columns([c for c in ("example_id", "offset_mapping") if c in features.column_names])
        output = self.evaluation_loop(self.get_eval_dataloader(inputs), description="Evaluation",
                                      prediction_loss_only=False, ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        answers = postprocess_qa_predictions(self.eval_examples, features, output.predictions, self.n_best_size,
                                             self.max_answer_length)
        references = {example["id"]: example["answers"]["text"] for example in self.eval_examples}
        metrics = {**output.metrics, **{f"{metric_key_prefix}_{name}": value
                                        for name, value in squad_metrics(answers, references).items()}}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
