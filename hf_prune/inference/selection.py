"""Which kernel pays for a layer: the one place that decides between the dense product and a sparse one.

`select_kernel` lists the sparse formats the layer's device, dtype and zero pattern allow (`sparse_candidates`),
then, with `kernel="auto"`:

- `measure=True` (the default): times the layer's own dense forward and every candidate on its real shape with
  `num_tokens` random tokens, `repeats` rounds taken in turn (so that the drift of a shared machine hits all alike),
  and keeps the fastest sparse candidate if its median time beats the dense median by `min_speedup`; the layer
  stays dense otherwise. Measured with the current `torch.get_num_threads()`: convert again after changing it.
- `measure=False`: the documented threshold instead. On CPU a layer goes sparse (CSR, or BSR when its zeros come in
  blocks) when at least `min_sparsity` of its weights are zero: a 1536x384 layer at 2048 tokens on one thread ran
  1.1x faster in CSR than dense at 90%, 1.3x at 95% and slower at 80% (`examples/benchmarks/layer_kernels.py`).
  On CUDA a 2:4 layer always goes 2:4.

`kernel="sparse"` takes the first candidate without timing (where there is one; the reason is reported where
there is none), `kernel="dense"` keeps the layer dense.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..validation import check_bool, check_choice, check_fraction, check_int, check_number
from .sparse_linear import KernelSpec, SparseLinear


#: `kernel` values: decide (`"auto"`), always sparse where a sparse format exists, never sparse.
KERNELS = ("auto", "sparse", "dense")
#: Tokens (rows of the layer's input) of the timed product.
DEFAULT_NUM_TOKENS = 512
#: Timed rounds; the decision compares medians.
DEFAULT_REPEATS = 5
#: How much faster (dense time / sparse time) a measured sparse kernel must be to be used.
DEFAULT_MIN_SPEEDUP = 1.1
#: The threshold rule of `measure=False` on CPU: the zero fraction from which a layer goes sparse.
DEFAULT_MIN_SPARSITY = 0.9
#: Tokens per MKL call tried by the measured path (plus all tokens at once).
CHUNK_SIZES = (32, 64, 128)
#: Tokens per MKL call without measuring, on one thread (with more, all tokens at once: `default_chunk_size`).
DEFAULT_CHUNK_SIZE = 32
#: The measured path stops timing a candidate that is this many times slower than dense in the first round.
GIVE_UP = 3.0
#: BSR block shapes tried, largest first, where the dimensions are multiples of them.
BSR_BLOCKSIZES = ((16, 16), (8, 8), (4, 4))
#: BSR is a candidate when its stored entries (non-zero blocks x block size) are at most this many per non-zero.
BSR_MAX_FILL = 1.5
#: dtypes torch's CPU sparse product (MKL) has kernels for.
CPU_SPARSE_DTYPES = (torch.float32, torch.float64)
#: 2:4 kernels need an Ampere (sm80) or newer GPU.
SEMI_STRUCTURED_MIN_CAPABILITY = (8, 0)
#: (rows, columns) the sparse weight's shape must be multiples of, per 2:4 backend and dtype (torch 2.13's
#: `SparseSemiStructuredTensor*._DTYPE_SHAPE_CONSTRAINTS`).
SEMI_STRUCTURED_SHAPES = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (32, 32)},
}


@dataclass(frozen=True)
class Platform:
    """Where a layer runs: the device type, and for CUDA its compute capability and whether cuSPARSELt is there."""

    device_type: str
    capability: tuple[int, int] | None = None
    cusparselt: bool = False


def platform_of(device: torch.device) -> Platform:
    """The `Platform` of `device`."""
    if device.type != "cuda":
        return Platform(device.type)
    return Platform("cuda", tuple(torch.cuda.get_device_capability(device)), torch.backends.cusparselt.is_available())


@dataclass(frozen=True)
class KernelChoice:
    """The decision for one layer.

    Args:
        layer (`str`): the module name.
        spec (`KernelSpec`, *optional*): the sparse kernel used; `None` when the layer stays dense.
        sparsity (`float`): the fraction of its weights that are zero.
        speedup (`float`, *optional*): measured dense time / time of the best sparse candidate (also when that is
            too slow to be used); `None` when nothing was measured.
        reason (`str`): why, in words.
    """

    layer: str
    spec: KernelSpec | None
    sparsity: float
    speedup: float | None
    reason: str

    @property
    def kernel(self) -> str:
        """`"dense"`, or the sparse format (`"csr"`, `"bsr"`, `"semi_structured"`)."""
        return self.spec.format if self.spec is not None else "dense"

    @property
    def is_sparse(self) -> bool:
        """Whether the layer multiplies with a sparse weight."""
        return self.spec is not None


def weight_matrix(module: nn.Linear | Conv1D) -> torch.Tensor:
    """The layer's weight as `(out_features, in_features)` (a view of a `Conv1D`'s transposed weight)."""
    weight = module.weight.detach()
    return weight.T if isinstance(module, Conv1D) else weight


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive weights along the input dimension (of `(out, in)`)."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def bsr_blocksize(weight: torch.Tensor) -> tuple[int, int] | None:
    """The largest of `BSR_BLOCKSIZES` whose non-zero blocks store at most `BSR_MAX_FILL` entries per non-zero
    weight of `weight` (`(out, in)`), or `None`: unstructured zeros are almost never a whole block."""
    nonzero = weight != 0
    count = int(nonzero.sum())
    rows, cols = weight.shape
    for r, c in BSR_BLOCKSIZES:
        if count == 0 or rows % r or cols % c:
            continue
        blocks = int(nonzero.reshape(rows // r, r, cols // c, c).any(3).any(1).sum())
        if blocks * r * c <= BSR_MAX_FILL * count:
            return r, c
    return None


def _semi_structured_candidates(weight: torch.Tensor, platform: Platform) -> tuple[list[KernelSpec], str]:
    if platform.capability is None or platform.capability < SEMI_STRUCTURED_MIN_CAPABILITY:
        return [], (f"2:4 kernels need compute capability {SEMI_STRUCTURED_MIN_CAPABILITY[0]}."
                    f"{SEMI_STRUCTURED_MIN_CAPABILITY[1]}+, this GPU has {platform.capability}")
    if not is_two_four(weight):
        return [], "not a 2:4 pattern (the only sparse kernel offered on CUDA)"
    backends = ["cusparselt"] if platform.cusparselt else []
    backend = next((b for b in backends + ["cutlass"] if weight.dtype in SEMI_STRUCTURED_SHAPES[b]), None)
    if backend is None:
        return [], f"no 2:4 kernel for {weight.dtype}"
    rows, cols = SEMI_STRUCTURED_SHAPES[backend][weight.dtype]
    if weight.shape[0] % rows or weight.shape[1] % cols:
        return [], f"2:4 ({backend}, {weight.dtype}) needs a shape of multiples of ({rows}, {cols})"
    return [KernelSpec("semi_structured", backend=backend)], ""


def default_chunk_size(num_tokens: int = DEFAULT_NUM_TOKENS) -> int | None:
    """Tokens per MKL call without measuring: `DEFAULT_CHUNK_SIZE` on one thread; all at once (`None`) with more
    threads or fewer tokens, as MKL's threads then wait for each other on every small call."""
    return DEFAULT_CHUNK_SIZE if torch.get_num_threads() == 1 and DEFAULT_CHUNK_SIZE < num_tokens else None


def sparse_candidates(weight: torch.Tensor, platform: Platform,
                      num_tokens: int = DEFAULT_NUM_TOKENS) -> tuple[list[KernelSpec], str]:
    """The sparse kernels `weight` (`(out, in)`) can use on `platform`, the preferred one (taken without
    measuring) first, and the reason when there is none.

    CPU, float32/float64: CSR, and BSR where the zeros come in blocks (`bsr_blocksize`), each with every chunk size
    of `CHUNK_SIZES` below `num_tokens` and with all tokens at once. CUDA: 2:4 where the pattern, the GPU, the
    dtype and the shape allow it. Nothing on other devices.
    """
    if platform.device_type == "cuda":
        return _semi_structured_candidates(weight, platform)
    if platform.device_type != "cpu":
        return [], f"no sparse kernel on {platform.device_type}"
    if weight.dtype not in CPU_SPARSE_DTYPES:
        return [], f"torch's CPU sparse product (MKL) has no {weight.dtype} kernel"
    chunks = [default_chunk_size(num_tokens)]
    chunks += [c for c in (*CHUNK_SIZES, None) if c not in chunks and (c is None or c < num_tokens)]
    blocksize = bsr_blocksize(weight)
    specs = [KernelSpec("bsr", chunk, blocksize) for chunk in chunks] if blocksize else []
    return specs + [KernelSpec("csr", chunk) for chunk in chunks], ""


def time_interleaved(functions: Sequence[Callable[[], object]], repeats: int,
                     synchronize: Callable[[], None] = lambda: None, give_up: float | None = None) -> list[float]:
    """Median seconds of each function: one warm-up call each, then `repeats` rounds calling each in turn.

    With `give_up`, a function that takes more than `give_up` times as long as the first one in the first round
    is not run again (its time is that of the first round): it has lost, and timing it further only costs."""
    times: list[list[float]] = [[] for _ in functions]
    for function in functions:
        function()
    synchronize()
    running = list(range(len(functions)))
    for round_ in range(repeats):
        for i in running:
            start = time.perf_counter()
            functions[i]()
            synchronize()
            times[i].append(time.perf_counter() - start)
        if round_ == 0 and give_up is not None:
            running = [i for i in running if i == 0 or times[i][0] <= give_up * times[0][0]]
    return [statistics.median(samples) for samples in times]


@torch.no_grad()
def measure_kernels(module: nn.Linear | Conv1D, specs: Sequence[KernelSpec], num_tokens: int = DEFAULT_NUM_TOKENS,
                    repeats: int = DEFAULT_REPEATS) -> tuple[float, list[float]]:
    """Median seconds of the layer's own (dense) forward and of a `SparseLinear` of each spec, on `num_tokens`
    random tokens of its input width (`time_interleaved`; a candidate over `GIVE_UP` times slower than dense in
    the first round is timed only once)."""
    weight = module.weight
    width = weight.shape[0] if isinstance(module, Conv1D) else weight.shape[1]
    x = torch.randn(num_tokens, width, generator=torch.Generator().manual_seed(0))
    x = x.to(device=weight.device, dtype=weight.dtype)
    layers = [SparseLinear.from_module(module, spec) for spec in specs]
    functions = [lambda: module(x)] + [lambda layer=layer: layer.multiply(x) for layer in layers]
    synchronize = torch.cuda.synchronize if weight.device.type == "cuda" else (lambda: None)
    times = time_interleaved(functions, repeats, synchronize, give_up=GIVE_UP)
    return times[0], times[1:]


def check_selection_options(kernel: str = "auto", measure: bool = True, num_tokens: int = DEFAULT_NUM_TOKENS,
                            repeats: int = DEFAULT_REPEATS, min_speedup: float = DEFAULT_MIN_SPEEDUP,
                            min_sparsity: float = DEFAULT_MIN_SPARSITY) -> None:
    """Raises a `ValueError` naming the first invalid option of `select_kernel`."""
    check_choice("kernel", kernel, KERNELS)
    check_bool("measure", measure)
    check_int("num_tokens", num_tokens, minimum=1)
    check_int("repeats", repeats, minimum=1)
    check_number("min_speedup", min_speedup, minimum=0, strict_minimum=True)
    check_fraction("min_sparsity", min_sparsity, strict_maximum=False)


def select_kernel(module: nn.Linear | Conv1D, layer: str = "", kernel: str = "auto", measure: bool = True,
                  num_tokens: int = DEFAULT_NUM_TOKENS, repeats: int = DEFAULT_REPEATS,
                  min_speedup: float = DEFAULT_MIN_SPEEDUP,
                  min_sparsity: float = DEFAULT_MIN_SPARSITY) -> KernelChoice:
    """Whether `module` (an `nn.Linear` or `Conv1D`, pruned entries zero) should multiply with a sparse weight,
    and with which kernel (see the module docstring for the rule).

    Args:
        module (`nn.Linear` or `Conv1D`): the layer.
        layer (`str`, *optional*): its name, for the report.
        kernel (`str`, *optional*, defaults to `"auto"`): `"auto"` (decide), `"sparse"` (the preferred sparse
            kernel, untimed, where one exists), `"dense"` (keep dense).
        measure (`bool`, *optional*, defaults to `True`): with `"auto"`, time the kernels; `False` applies the
            threshold rule.
        num_tokens (`int`, *optional*, defaults to 512): tokens (batch x sequence) of the timed product; use your
            workload's.
        repeats (`int`, *optional*, defaults to 5): timed rounds (medians are compared).
        min_speedup (`float`, *optional*, defaults to 1.1): dense time / sparse time a measured kernel must reach.
        min_sparsity (`float`, *optional*, defaults to 0.9): the threshold rule's zero fraction (CPU).

    Returns:
        `KernelChoice`
    """
    check_selection_options(kernel, measure, num_tokens, repeats, min_speedup, min_sparsity)
    weight = weight_matrix(module)
    sparsity = (weight.numel() - int(torch.count_nonzero(weight))) / max(1, weight.numel())  # exact at 20% zeros
    if kernel == "dense":
        return KernelChoice(layer, None, sparsity, None, "kernel='dense'")
    specs, why_not = sparse_candidates(weight, platform_of(weight.device), num_tokens)
    if not specs:
        return KernelChoice(layer, None, sparsity, None, why_not)
    if kernel == "sparse":
        return KernelChoice(layer, specs[0], sparsity, None, "kernel='sparse'")
    if not measure:
        if specs[0].format == "semi_structured":
            return KernelChoice(layer, specs[0], sparsity, None, "2:4 pattern (threshold rule, not measured)")
        if sparsity >= min_sparsity:
            return KernelChoice(layer, specs[0], sparsity, None, f"sparsity {sparsity:.1%} >= min_sparsity "
                                f"{min_sparsity:.1%} (threshold rule, not measured)")
        return KernelChoice(layer, None, sparsity, None, f"sparsity {sparsity:.1%} < min_sparsity {min_sparsity:.1%} "
                            "(threshold rule, not measured)")
    dense, times = measure_kernels(module, specs, num_tokens, repeats)
    best = min(range(len(specs)), key=times.__getitem__)
    speedup = dense / times[best] if times[best] > 0 else float("inf")
    measured = f"measured at {num_tokens} tokens, {torch.get_num_threads()} threads"
    if speedup >= min_speedup:
        return KernelChoice(layer, specs[best], sparsity, speedup, f"{speedup:.2f}x faster than dense ({measured})")
    return KernelChoice(layer, None, sparsity, speedup, f"best sparse kernel ({specs[best]}) {speedup:.2f}x dense < "
                        f"min_speedup {min_speedup:g} ({measured})")
