"""`SparseLinear`: an inference-only Linear layer that multiplies with a sparse weight.

CPU: torch's sparse CSR or BSR tensors, multiplied by MKL (`torch.addmm(sparse, dense)`), float32 and float64 only
(torch has no CPU sparse kernel for bfloat16 or float16). CUDA: 2:4 semi-structured weights
(`torch.sparse.SparseSemiStructuredTensorCUSPARSELT` / `...CUTLASS`, compute capability 8.0+). Which format a
layer gets, and whether it gets one at all, is decided in `hf_prune.inference.selection`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


#: The sparse formats `SparseLinear` multiplies with.
FORMATS = ("csr", "bsr", "semi_structured")
#: The 2:4 backends, as torch names them (`SparseSemiStructuredTensor.BACKEND`).
SEMI_STRUCTURED_BACKENDS = ("cusparselt", "cutlass")
_INT32_MAX = 2**31 - 1
#: The dtypes torch's CPU sparse (CSR / BSR) kernels multiply in.
KERNEL_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class KernelSpec:
    """How a `SparseLinear` multiplies.

    Args:
        format (`str`): `"csr"`, `"bsr"` (CPU, MKL) or `"semi_structured"` (2:4, CUDA).
        chunk_size (`int`, *optional*): CSR/BSR only: the tokens (rows of the input) multiplied per call; `None`
            multiplies all at once. Small chunks keep the slice of the input and of the output that MKL's sparse
            kernel walks through in the CPU caches.
        blocksize (`tuple[int, int]`, *optional*): BSR only: the block shape.
        backend (`str`, *optional*): semi-structured only: `"cusparselt"` or `"cutlass"`.
    """

    format: str
    chunk_size: int | None = None
    blocksize: tuple[int, int] | None = None
    backend: str | None = None

    def __str__(self) -> str:
        if self.format == "semi_structured":
            return f"2:4 ({self.backend})"
        block = f" {self.blocksize[0]}x{self.blocksize[1]}" if self.blocksize else ""
        return f"{self.format}{block}, {self.chunk_size or 'all'} tokens/call"


def to_sparse_tensor(weight: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """`weight` (`(out_features, in_features)`, dense, pruned entries zero) in the sparse format of `spec`.

    CSR/BSR indices are int32 where they fit, the index type MKL works with (int64 ones would be converted on every
    call)."""
    weight = weight.detach().contiguous()
    if spec.format == "semi_structured":
        cls = (torch.sparse.SparseSemiStructuredTensorCUSPARSELT if spec.backend == "cusparselt"
               else torch.sparse.SparseSemiStructuredTensorCUTLASS)
        return cls.from_dense(weight)
    if spec.format not in ("csr", "bsr"):
        raise ValueError(f"Unknown sparse format {spec.format!r}; expected one of {FORMATS}.")
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per process
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta", category=UserWarning)
        if spec.format == "csr":
            sparse, build = weight.to_sparse_csr(), torch.sparse_csr_tensor
        else:
            sparse, build = weight.to_sparse_bsr(spec.blocksize), torch.sparse_bsr_tensor
        crow, col = sparse.crow_indices(), sparse.col_indices()
        if max(weight.shape) < _INT32_MAX and col.numel() < _INT32_MAX:
            sparse = build(crow.int(), col.int(), sparse.values(), sparse.shape, check_invariants=False)
    return sparse


def sparse_addmm(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                 chunk_size: int | None) -> torch.Tensor:
    """`x @ weight.T + bias` for a CSR/BSR `weight` and a 2-D dense `x` (`(tokens, in_features)`), `chunk_size`
    tokens per MKL call; returns a contiguous `(tokens, out_features)` tensor."""
    chunks = x.split(chunk_size) if chunk_size and x.shape[0] > chunk_size else (x,)
    column = bias[:, None] if bias is not None else None
    # sparse @ dense is what MKL computes: (out, in) @ (in, tokens), transposed back
    outputs = [(torch.mm(weight, chunk.T) if column is None else torch.addmm(column, weight, chunk.T)).T
               for chunk in chunks]
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0].contiguous()


class _InferenceOnly(torch.autograd.Function):
    """Runs the sparse product in a graph that needs gradients, and raises on backward."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, layer: SparseLinear) -> torch.Tensor:
        ctx.layer_repr = repr(layer)
        out = layer.multiply_2d(flat)
        return out if out._base is None else out.clone()  # a Function's view output could not change in place

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise RuntimeError(f"{ctx.layer_repr} is for inference only and has no backward: its weight is a sparse "
                           "buffer, not a trainable parameter. Train the PrunedModel before to_sparse_inference(), "
                           "or call hf_prune.inference.restore_dense_layers(model) first.")


class SparseLinear(nn.Module):
    """A Linear layer for inference whose weight is a sparse tensor (see `KernelSpec`).

    `forward(x)` is `x @ W.T + b` for any leading dimensions of `x` (`(batch, seq, in_features)`, ...), like the
    `nn.Linear` or GPT-2 `Conv1D` it replaces. The weight and bias are buffers, not parameters: nothing of the layer
    trains, and a backward pass through it raises a `RuntimeError`. Its `state_dict` holds the dense weight in the
    replaced layer's layout (`(in, out)` for a `Conv1D`), so `save_pretrained` of a converted model writes an
    ordinary checkpoint, and `load_state_dict` re-sparsifies what it loads.

    Args:
        weight (`torch.Tensor`): the dense weight, `(out_features, in_features)`, pruned entries zero.
        bias (`torch.Tensor`, *optional*): the bias, `(out_features,)`.
        spec (`KernelSpec`): the sparse format and how to multiply.
        transposed (`bool`, *optional*, defaults to `False`): the layer replaces a `Conv1D` (weight stored
            `(in, out)` in state dicts).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: KernelSpec,
                 transposed: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.spec = spec
        self.transposed = transposed
        #: The dtype `.half()` / `.to(dtype)` cast the model to (None: not cast). The sparse weight keeps its own
        #: (CPU sparse kernels are float32 / float64 only); the state dict and `to_dense_module` take this one.
        self.cast_dtype: torch.dtype | None = None
        with torch.inference_mode(False):  # converted under inference_mode, the buffers must still save and copy
            self.register_buffer("weight", to_sparse_tensor(weight.clone() if weight.is_inference() else weight, spec))
            self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    @classmethod
    def from_module(cls, module: nn.Linear | Conv1D, spec: KernelSpec) -> SparseLinear:
        """The sparse equivalent of an `nn.Linear` or GPT-2 `Conv1D` (its weights are copied, not shared)."""
        if isinstance(module, Conv1D):
            return cls(module.weight.detach().T, module.bias, spec, transposed=True)
        if isinstance(module, nn.Linear):
            return cls(module.weight.detach(), module.bias, spec)
        raise TypeError(f"SparseLinear replaces nn.Linear or Conv1D layers, not {type(module).__name__}.")

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense `(out_features, in_features)` tensor."""
        return self.weight.to_dense()

    def to_dense_module(self) -> nn.Linear | Conv1D:
        """The `nn.Linear` (or `Conv1D`) this layer computes, with trainable parameters again, in the dtype the
        model was cast to since the conversion (if it was)."""
        weight = self.dense_weight().to(self.cast_dtype or self.weight.dtype)
        if self.transposed:
            module = Conv1D(self.out_features, self.in_features).to(device=weight.device, dtype=weight.dtype)
            weight = weight.T
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b` for any leading dimensions of `x`, without the autograd guard of `forward`."""
        return self.multiply_2d(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def multiply_2d(self, flat: torch.Tensor) -> torch.Tensor:
        """`flat @ W.T + b` for a `(tokens, in_features)` input. CSR/BSR: `flat` is multiplied in the weight's dtype
        (MKL has no bfloat16 / float16 kernel) and the result returned in the dtype a Linear layer would give:
        autocast's where it is on, else the one the model was cast to (`cast_dtype`: models such as T5 cast their
        input to `weight.dtype`, float32 here), else `flat`'s."""
        if not flat.is_floating_point():  # a Linear layer refuses them too; the casts below would truncate
            raise TypeError(f"{type(self).__name__} multiplies floating-point inputs; got {flat.dtype}.")
        if self.spec.format == "semi_structured":
            return F.linear(flat.contiguous(), self.weight, self.bias)
        device = flat.device.type  # autocast leaves float64 alone, as it does for a Linear layer
        autocast = torch.is_autocast_enabled(device) and flat.dtype != torch.float64
        dtype = torch.get_autocast_dtype(device) if autocast else self.cast_dtype or flat.dtype
        with torch.autocast(device, enabled=False):
            out = sparse_addmm(self.weight, self.bias, flat.to(self.weight.dtype), self.spec.chunk_size)
        return out.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.multiply(x)
        # the Function returns a tensor of its own (no view of it), so the output can change in place
        flat = _InferenceOnly.apply(x.reshape(-1, self.in_features), self)
        return flat.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        """`.to(device)` / `.cuda()` move a CSR/BSR weight (`.to_empty(device)` of a meta one gives an empty
        weight for `load_state_dict` to fill); `.double()` / `.float()` cast it; `.half()` / `.to(bfloat16)` leave
        its dtype (torch's CPU sparse kernels have float32 and float64 only), `multiply` casts the inputs to it,
        and the dtype asked for is recorded (`cast_dtype`) for the state dict and `to_dense_module`."""
        if self.spec.format == "semi_structured":
            return super()._apply(fn, recurse)
        # two probes tell a cast (`.half()`, `.float()`, `.to(dtype)`) from a move; they raise as `.to` would
        probes = {dtype: fn(torch.empty(0, dtype=dtype, device=self.weight.device))
                  for dtype in (torch.float16, torch.float64)}
        device = probes[torch.float16].device
        cast = next((probe.dtype for dtype, probe in probes.items() if probe.dtype != dtype), None)
        dtype = cast if cast in KERNEL_DTYPES else self.weight.dtype
        if cast is not None:
            self.cast_dtype = None if cast == dtype else cast
        with torch.inference_mode(False):  # under inference_mode too, the buffers must still save and copy
            if self.weight.is_meta and device.type != "meta":  # `to_empty()`: `load_state_dict` sets the entries
                shape = (self.out_features, self.in_features)
                self.weight = to_sparse_tensor(torch.zeros(shape, dtype=dtype, device=device), self.spec)
                self.bias = None if self.bias is None else torch.empty_like(self.bias, device=device, dtype=dtype)
                return self
            self.weight = self.weight.to(device=device, dtype=dtype)
            if self.bias is not None:
                self.bias = self.bias.to(device=device, dtype=dtype)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseLinear:
        """A copy rebuilt from the dense weight (torch cannot deep-copy a sparse CSR/BSR tensor's storage)."""
        copy = SparseLinear(self.dense_weight(), self.bias, self.spec, self.transposed).train(self.training)
        copy.cast_dtype = self.cast_dtype
        memo[id(self)] = copy
        return copy

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.spec}")

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        weight = self.dense_weight().to(self.cast_dtype or self.weight.dtype)  # the dtype of the rest of the model
        destination[prefix + "weight"] = weight.T.contiguous() if self.transposed else weight
        if self.bias is not None:
            bias = self.bias if keep_vars else self.bias.detach()
            destination[prefix + "bias"] = bias.to(self.cast_dtype or bias.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        shape = (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)
        names = ("weight", "bias") if self.bias is not None else ("weight",)
        if strict:  # as nn.Module does: keys under this layer's prefix that are none of its tensors
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix)
                                   and "." not in key[len(prefix):] and key[len(prefix):] not in names)
        for name in names:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            expected = shape if name == "weight" else (self.out_features,)
            if tuple(value.shape) != expected:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                                  f"shape in the current model is {expected}.")
                continue
            with torch.inference_mode(False):  # loaded under inference_mode, the buffers must still save and copy
                value = value.detach().to(device=self.weight.device, dtype=self.weight.dtype)
                value = value.clone() if value.is_inference() else value
                if name == "bias":
                    self.bias.copy_(value)
                else:
                    self.weight = to_sparse_tensor(value.T if self.transposed else value, self.spec)
