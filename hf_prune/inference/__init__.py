"""Sparse inference for unstructured masks: masked Linear layers multiply with a sparse weight where that is faster.

`sparse_linear`: the `SparseLinear` layer (CSR/BSR on CPU through MKL, 2:4 on CUDA); `selection`: the one decision
of which kernel pays for a layer (`select_kernel`); `convert`: swapping the layers of a model
(`to_sparse_inference`, behind `PrunedModel.to_sparse_inference`) and back (`restore_dense_layers`).
"""

from .convert import SparseInferenceReport, restore_dense_layers, to_sparse_inference
from .selection import (
    DEFAULT_MIN_SPARSITY,
    DEFAULT_MIN_SPEEDUP,
    DEFAULT_NUM_TOKENS,
    DEFAULT_REPEATS,
    KERNELS,
    KernelChoice,
    Platform,
    measure_kernels,
    select_kernel,
    sparse_candidates,
)
from .sparse_linear import FORMATS, KernelSpec, SparseLinear


__all__ = [
    "DEFAULT_MIN_SPARSITY",
    "DEFAULT_MIN_SPEEDUP",
    "DEFAULT_NUM_TOKENS",
    "DEFAULT_REPEATS",
    "FORMATS",
    "KERNELS",
    "KernelChoice",
    "KernelSpec",
    "Platform",
    "SparseInferenceReport",
    "SparseLinear",
    "measure_kernels",
    "restore_dense_layers",
    "select_kernel",
    "sparse_candidates",
    "to_sparse_inference",
]
