"""One Linear layer, dense against CSR: where the sparse kernel starts to pay, and what slicing the tokens does.

A random `--out x --in` float32 layer (default 1536x384, a MiniLM feed-forward up projection) is magnitude-pruned to
each of `--sparsities`, and `--tokens` random inputs go through its dense forward and through `SparseLinear` CSR
products, one per `--chunk_sizes` entry (tokens per MKL call; 0: all at once), timed with
`hf_prune.inference.selection.time_interleaved` (`--repeats` rounds, each kernel in turn, medians). Ratios are dense
time / sparse time, measured side by side in one run (above 1: sparse is faster).

    python examples/benchmarks/layer_kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import positive_int, print_and_write  # noqa: E402

from hf_prune.inference import KernelSpec, SparseLinear  # noqa: E402
from hf_prune.inference.selection import time_interleaved  # noqa: E402


def pruned_layer(out_features: int, in_features: int, sparsity: float) -> nn.Linear:
    """A random Linear layer with its `sparsity` smallest-magnitude weights set to zero."""
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        weight = layer.weight
        count = round(sparsity * weight.numel())
        if count:
            threshold = weight.abs().flatten().kthvalue(count).values
            weight[weight.abs() <= threshold] = 0.0
    return layer


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=positive_int, default=1536, help="Output features.")
    parser.add_argument("--in", dest="in_features", type=positive_int, default=384, help="Input features.")
    parser.add_argument("--tokens", type=positive_int, default=2048)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.85, 0.9, 0.95])
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[32, 0],
                        help="Tokens per MKL call of each CSR variant (0: all tokens in one call).")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if any(not 0 <= s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must be in [0, 1), got {args.sparsities}")
    if any(c < 0 for c in args.chunk_sizes):
        parser.error(f"--chunk_sizes must be >= 0, got {args.chunk_sizes}")
    torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, args.in_features, generator=torch.Generator().manual_seed(1))
    names = [f"csr, {c} tokens/call" if c else "csr, all tokens in one call" for c in args.chunk_sizes]
    lines = [f"{args.out}x{args.in_features} float32 Linear, {args.tokens} tokens, {args.threads} thread(s), "
             f"torch {torch.__version__}, medians of {args.repeats} rounds; dense time / sparse time", "",
             "| sparsity | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for sparsity in args.sparsities:
        layer = pruned_layer(args.out, args.in_features, sparsity)
        sparse = [SparseLinear.from_module(layer, KernelSpec("csr", chunk_size=c or None)) for c in args.chunk_sizes]
        functions = [lambda: layer(x)] + [lambda s=s: s(x) for s in sparse]
        dense, *others = time_interleaved(functions, args.repeats)
        lines.append(f"| {sparsity:.0%} | " + " | ".join(f"{dense / t:.2f}x" for t in others) + " |")
        print(lines[-1], flush=True)
    print_and_write("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
