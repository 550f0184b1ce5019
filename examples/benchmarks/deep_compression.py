"""Deep Compression (Han, Mao & Dally 2016) of all-MiniLM-L6-v2 fine-tuned on SST-2: prune, quantize, Huffman code.

Stages, each a `Trainer` run from the previous one (batch 32, sequences of 64 tokens by default), on a random
`--max_train_samples`-row subsample of SST-2 train (seed 0, as in the other SST-2 benchmarks):

1. dense fine-tuning (`--max_steps`, `--learning_rate`);
2. gradual magnitude pruning to `--sparsity` (cubic schedule over the first 75% of `--prune_steps`,
   `MagnitudePruningCallback`, `--learning_rate`);
3. for each of `--bits`: trained quantization from the pruned model (`QuantizationCallback`, `--quant_steps`,
   `--quant_learning_rate`);
4. Huffman coding: `PrunedModel.save_pretrained(folder, compression="deep", bits=...)`, loaded back with
   `PrunedModel.from_pretrained` and evaluated again (lossless: it must match stage 3 exactly, which the script
   checks).

Printed (Markdown, also written to `--output`): SST-2 dev accuracy after each stage, the bytes the targeted weights
(the Linear layers inside the Transformer blocks) take on disk against dense fp32, and the size of the saved model
folder (every file: config, weights, masks, pruning config, model card; no tokenizer is saved). The targeted
weights' bytes are their tensors in the weights file plus the whole `pruning_masks.safetensors` (their positions).
Run from the repository root, e.g.:

    OMP_NUM_THREADS=2 python examples/benchmarks/deep_compression.py --output deep_compression.md
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from common import (
    accuracy,
    add_common_arguments,
    fine_tune,
    fraction,
    load_model,
    positive_int,
    print_and_write,
    setup_sst2,
)
from safetensors import safe_open

from hf_prune import MagnitudePruningCallback, PrunedModel, PruningConfig
from hf_prune.compression import QuantizationCallback
from hf_prune.constants import COMPRESSED_WEIGHTS_NAME, DEEP_COMPRESSED_WEIGHTS_NAME, MASKS_NAME
from hf_prune.targets import find_targets


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, max_train_samples=8000, max_steps=300)
    parser.add_argument("--prune_steps", type=positive_int, default=600,
                        help="Steps of the pruning stage (--max_steps: of the dense one).")
    parser.add_argument("--quant_steps", type=positive_int, default=200, help="Steps of each quantization stage.")
    parser.add_argument("--sparsity", type=fraction, default=0.9)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--quant_learning_rate", type=float, default=2e-5,
                        help="Quantization stage: AdamW for the other parameters and, unless --centroid_lr, the "
                             "centroids' SGD step.")
    parser.add_argument("--centroid_lr", type=float, default=None, help="SGD learning rate of the centroids.")
    parser.add_argument("--work_dir", default=None,
                        help="Where checkpoints and saved folders go (default: a temp dir, removed after).")
    args = parser.parse_args(argv)
    for bits in args.bits:  # the callback's own checks, before the dense stage
        try:
            QuantizationCallback(bits=bits, learning_rate=args.centroid_lr)
        except ValueError as err:
            parser.error(f"--bits {bits} / --centroid_lr {args.centroid_lr}: {err}")
    return args


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
    _, collator, train_set, dev_set = setup_sst2(args)
    model = load_model(args.model, args.seed)
    targets = [target.name for target in find_targets(model, PruningConfig())]
    params = dict(model.named_parameters())
    dense_bytes = sum(4 * params[name].numel() for name in targets)
    rows, timings = [], {}

    start = time.time()
    fine_tune(args, model, train_set, collator, os.path.join(work, "dense"))
    timings["dense"] = time.time() - start
    model.save_pretrained(os.path.join(work, "dense-model"))
    rows.append(("dense fine-tuned (fp32)", "32", accuracy(model, dev_set, collator, args.batch_size), dense_bytes,
                 folder_bytes(os.path.join(work, "dense-model"))))

    start = time.time()
    pruning = MagnitudePruningCallback(PruningConfig(final_sparsity=args.sparsity, schedule="cubic"))
    fine_tune(args, model, train_set, collator, os.path.join(work, "prune"), [pruning], args.prune_steps)
    timings["prune"] = time.time() - start
    masks = {name: mask.clone() for name, mask in pruning.masks.items()}
    pruned_dir = os.path.join(work, "pruned-model")
    PrunedModel(model, masks, pruning.config).save_pretrained(pruned_dir, compression="sparse")
    sparse_bytes = (tensor_bytes(os.path.join(pruned_dir, COMPRESSED_WEIGHTS_NAME), [f"{n}.values" for n in masks])
                    + os.path.getsize(os.path.join(pruned_dir, MASKS_NAME)))
    sparsity = 1 - sum(int(mask.sum()) for mask in masks.values()) / sum(mask.numel() for mask in masks.values())
    rows.append((f"pruned {sparsity:.1%} (bitmask + fp32 values)", "32",
                 accuracy(model, dev_set, collator, args.batch_size), sparse_bytes, folder_bytes(pruned_dir)))

    quant_args = argparse.Namespace(**{**vars(args), "learning_rate": args.quant_learning_rate})
    checks = []
    for bits in args.bits:
        start = time.time()
        quantized_model = copy.deepcopy(model)
        quantization = QuantizationCallback(masks, bits=bits, learning_rate=args.centroid_lr)
        fine_tune(quant_args, quantized_model, train_set, collator, os.path.join(work, f"quant{bits}"), [quantization],
                  args.quant_steps)
        timings[f"quantize {bits}-bit"] = time.time() - start
        quantized_accuracy = accuracy(quantized_model, dev_set, collator, args.batch_size)
        fixed_width = sum(4 * 2**bits + -(-q.indices.numel() * bits // 8) + -(-q.mask.numel() // 8)
                          for q in quantization.quantized.values())
        rows.append((f"quantized {bits}-bit (fixed-width indices + bitmask, computed)", str(bits),
                     quantized_accuracy, fixed_width, None))

        folder = os.path.join(work, f"deep{bits}-model")
        PrunedModel(quantized_model, masks, pruning.config).save_pretrained(folder, compression="deep", bits=bits)
        loaded = PrunedModel.from_pretrained(folder).model
        state = quantized_model.state_dict()
        identical = all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in state.items())
        loaded_accuracy = accuracy(loaded, dev_set, collator, args.batch_size)
        checks.append(f"{bits}-bit: loaded weights bit-identical to the trained ones: {'yes' if identical else 'NO'}; "
                      f"dev accuracy {loaded_accuracy:.4f} vs {quantized_accuracy:.4f} before saving "
                      f"({'identical' if loaded_accuracy == quantized_accuracy else 'DIFFERENT'}).")
        deep_bytes = (tensor_bytes(os.path.join(folder, DEEP_COMPRESSED_WEIGHTS_NAME), list(masks))
                      + os.path.getsize(os.path.join(folder, MASKS_NAME)))
        rows.append((f"Deep Compression {bits}-bit (Huffman coded, loaded back)", str(bits), loaded_accuracy,
                     deep_bytes, folder_bytes(folder)))

    report = render(args, command, rows, dense_bytes, timings, checks, len(train_set), len(dev_set))
    print_and_write(report, args.output)
    return report


def render(args: argparse.Namespace, command: str, rows: list, dense_bytes: int, timings: dict[str, float],
           checks: list[str], num_train: int, num_dev: int) -> str:
    lines = [
        "## Deep Compression: all-MiniLM-L6-v2 on SST-2",
        "",
        f"`{command}`",
        "",
        f"{num_train} SST-2 train rows, {num_dev} dev rows, batch {args.batch_size}, {args.max_seq_length} tokens; "
        f"steps: dense {args.max_steps}, pruning {args.prune_steps}, quantization {args.quant_steps} per bit "
        f"width; lr {args.learning_rate} (quantization {args.quant_learning_rate}), seed {args.seed}. Targeted "
        f"weights: the Linear layers inside the 6 blocks ({dense_bytes // 4:,} weights); embeddings, LayerNorms, "
        "biases, pooler and head stay fp32 in every folder.",
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
