"""Sparse inference (`hf_prune.inference`, `PrunedModel.to_sparse_inference`) on tiny models: equal outputs,
generate(), the kernel decision (forced, threshold, measured with mocked and with real timings, 2:4 on a mocked
GPU), state dicts, and bad input. No test asserts anything about speed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_prune import PrunedModel, Pruner, PruningConfig
from hf_prune.inference import (
    KernelSpec,
    Platform,
    SparseLinear,
    restore_dense_layers,
    select_kernel,
    selection,
    sparse_candidates,
    to_sparse_inference,
)


SEQ2SEQ = ("t5", "bart")
TOLERANCE = 1e-4


def pruned(kind: str, sparsity: float = 0.9) -> PrunedModel:
    model = TINY_MODELS[kind]().eval()
    config = PruningConfig(final_sparsity=sparsity, schedule="oneshot")
    pruner = Pruner(model, config)
    pruner.prune_to(sparsity)
    return PrunedModel(model, pruner.masks, config)


def batch(kind: str, batch_size: int = 3, seq_len: int = 9) -> dict[str, torch.Tensor]:
    """Random tokens with a padded last row, so that batching with an attention mask is covered."""
    ids = torch.randint(3, 99, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
    if kind in SEQ2SEQ:
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def hidden_states(kind: str, output) -> tuple[torch.Tensor, ...]:
    if kind in SEQ2SEQ:
        return output.encoder_hidden_states + output.decoder_hidden_states
    return output.hidden_states


def sparse_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, SparseLinear)]


def masked_linear(out_features: int, in_features: int, sparsity: float = 0.9, bias: bool = True,
                  dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(out_features, in_features) >= sparsity)
    return layer


def two_four(rows: int, cols: int, dtype: torch.dtype = torch.float16) -> nn.Linear:
    layer = nn.Linear(cols, rows, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([1, 0, 1, 0], dtype=dtype).repeat(rows, cols // 4))
    return layer


# ------------------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("spec", [KernelSpec("csr", 4), KernelSpec("csr", None), KernelSpec("bsr", 4, (4, 4))],
                         ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_linear_for_any_leading_dims(spec, bias):
    layer = masked_linear(24, 16, bias=bias)
    sparse = SparseLinear.from_module(layer, spec)
    assert sparse.weight.layout == (torch.sparse_csr if spec.format == "csr" else torch.sparse_bsr)
    assert not list(sparse.parameters())
    with torch.no_grad():
        for shape in [(16,), (5, 16), (2, 7, 16), (2, 3, 2, 16), (0, 16)]:
            x = torch.randn(shape)
            out = sparse(x)
            assert out.shape == (*shape[:-1], 24)
            torch.testing.assert_close(out, layer(x), atol=TOLERANCE, rtol=0)


def test_sparse_linear_equals_conv1d_and_float64():
    torch.manual_seed(0)
    conv = Conv1D(12, 20)  # GPT-2's layer: weight (in, out)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(20, 12) >= 0.9)
        conv.bias.normal_()
    sparse = SparseLinear.from_module(conv, KernelSpec("csr", 8))
    assert (sparse.in_features, sparse.out_features, sparse.transposed) == (20, 12, True)
    x = torch.randn(3, 11, 20)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), atol=TOLERANCE, rtol=0)
        double = masked_linear(8, 12, dtype=torch.float64)
        x = torch.randn(4, 12, dtype=torch.float64)
        torch.testing.assert_close(SparseLinear.from_module(double, KernelSpec("csr", 2))(x), double(x))


def test_sparse_linear_state_dict_is_the_dense_layers():
    for layer in (masked_linear(8, 12), Conv1D(8, 12)):
        sparse = SparseLinear.from_module(layer, KernelSpec("csr"))
        state = sparse.state_dict()
        assert state.keys() == layer.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
        other = SparseLinear.from_module(type(layer)(12, 8) if isinstance(layer, nn.Linear) else Conv1D(8, 12),
                                         KernelSpec("csr"))
        other.load_state_dict(state)
        assert other.weight.layout == torch.sparse_csr
        assert torch.equal(other.dense_weight(), sparse.dense_weight())
        restored = sparse.to_dense_module()
        assert type(restored) is type(layer) and restored.weight.requires_grad
        assert all(torch.equal(restored.state_dict()[k], v) for k, v in layer.state_dict().items())


def test_sparse_linear_under_autocast_and_half_casts_around_the_float32_kernel():
    layer = masked_linear(8, 12)
    sparse = SparseLinear.from_module(layer, KernelSpec("csr"))
    x = torch.randn(5, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        out = sparse(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    assert sparse.half() is sparse and sparse.weight.dtype == torch.float32  # no fp16 CPU sparse kernel
    assert sparse(x.half()).dtype == torch.float16
    torch.testing.assert_close(sparse(x.half()).float(), layer(x.half().float()), atol=1e-2, rtol=1e-2)


def test_a_layer_cast_to_float64_after_conversion_multiplies_in_float64():
    layer = masked_linear(8, 12)
    sparse = SparseLinear.from_module(layer, KernelSpec("csr"))
    sparse.double()
    layer.double()
    assert sparse.weight.dtype == sparse.bias.dtype == torch.float64 and sparse.cast_dtype is None
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x), atol=1e-12, rtol=0)
    assert sparse.float().weight.dtype == torch.float32


def test_a_layer_under_autograd_gives_an_output_that_can_change_in_place():
    sparse = SparseLinear.from_module(masked_linear(8, 12), KernelSpec("csr"))
    x = torch.randn(2, 5, 12, requires_grad=True)
    expected = sparse(x.detach()).relu()
    torch.testing.assert_close(sparse(x).relu_(), expected)  # as with nn.Linear: hooks and user code do this


def test_integer_inputs_are_refused_not_truncated():
    sparse = SparseLinear.from_module(masked_linear(8, 12), KernelSpec("csr"))
    with pytest.raises(TypeError, match="multiplies floating-point inputs; got torch.int64"):
        sparse(torch.ones(2, 12, dtype=torch.int64))


def test_a_float64_input_under_autocast_stays_float64_as_with_a_linear_layer():
    layer = masked_linear(8, 12).double()
    sparse = SparseLinear.from_module(layer, KernelSpec("csr"))
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = layer(x), sparse(x)
    assert out.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(out, expected)


def test_a_cast_model_saves_and_restores_in_its_new_dtype():
    wrapped = pruned("bert")
    wrapped.to_sparse_inference(kernel="sparse")
    wrapped.half()
    assert {t.dtype for t in wrapped.model.state_dict().values() if t.is_floating_point()} == {torch.float16}
    restore_dense_layers(wrapped.model)
    assert {p.dtype for p in wrapped.model.parameters()} == {torch.float16}
    wrapped.model(**batch("bert"))  # one dtype again: the restored layers run with the others
    again = pruned("bert")
    again.to_sparse_inference(kernel="sparse")
    again.half().float()  # a cast back to the kernels' own dtype, after a move: float32 throughout
    again.to("cpu")
    assert {t.dtype for t in again.model.state_dict().values() if t.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_t5_keeps_its_residual_stream_in_the_dtype_it_was_cast_to(dtype):
    # T5's feed-forward casts its hidden states to wo.weight.dtype: the sparse weight's float32, and the residual
    # stream after it stayed float32 until the next norm
    wrapped = pruned("t5")
    dense = copy.deepcopy(wrapped.model).to(dtype)
    wrapped.to_sparse_inference(kernel="sparse")
    wrapped.to(dtype)
    with torch.no_grad():
        expected, out = dense(**batch("t5")), wrapped.model(**batch("t5"))
    assert {h.dtype for h in out.encoder_hidden_states + out.decoder_hidden_states} == {dtype}
    torch.testing.assert_close(out.logits, expected.logits, atol=3e-2, rtol=3e-2)


def test_a_model_converted_under_inference_mode_still_saves_copies_and_restores():
    wrapped = pruned("bert")
    with torch.inference_mode():
        wrapped.to_sparse_inference(kernel="sparse")
        expected = wrapped.model(**batch("bert")).logits
    state = wrapped.model.state_dict()
    copied = copy.deepcopy(wrapped.model)
    torch.testing.assert_close(copied(**batch("bert")).logits, expected)
    restore_dense_layers(wrapped.model)
    assert all(torch.equal(wrapped.model.state_dict()[name], tensor) for name, tensor in state.items())


def test_a_state_dict_loaded_under_inference_mode_still_saves_and_copies():
    wrapped = pruned("bert")
    wrapped.to_sparse_inference(kernel="sparse")
    state = {name: tensor.clone() for name, tensor in wrapped.model.state_dict().items()}
    with torch.inference_mode():
        wrapped.model.load_state_dict(state)
    assert all(torch.equal(wrapped.model.state_dict()[name], tensor) for name, tensor in state.items())
    copy.deepcopy(wrapped.model)


@pytest.mark.parametrize("spec", [KernelSpec("csr"), KernelSpec("bsr", blocksize=(4, 4))], ids=["csr", "bsr"])
def test_sparse_linear_moves_to_the_meta_device_and_back_with_its_layout(spec):
    layer = masked_linear(8, 12)
    sparse = SparseLinear.from_module(layer, spec)
    assert sparse.to("meta") is sparse and sparse.weight.device.type == sparse.bias.device.type == "meta"
    assert sparse.weight.layout == (torch.sparse_csr if spec.format == "csr" else torch.sparse_bsr)
    assert {name: tuple(t.shape) for name, t in sparse.state_dict().items()} == {"weight": (8, 12), "bias": (8,)}
    with pytest.raises(NotImplementedError, match="meta tensor"):  # as for any module: a meta tensor has no data
        sparse.to("cpu")
    sparse.to_empty(device="cpu").load_state_dict(layer.state_dict())  # as after init_empty_weights()
    assert sparse.weight.device.type == "cpu" and torch.equal(sparse.dense_weight(), layer.weight.detach())
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x))


def test_sparse_linear_deep_copies_and_refuses_unexpected_keys():
    import copy

    sparse = SparseLinear.from_module(masked_linear(8, 12, bias=False), KernelSpec("csr")).eval()
    twin = copy.deepcopy(sparse)
    assert twin.weight.layout == torch.sparse_csr and not twin.training
    assert torch.equal(twin.dense_weight(), sparse.dense_weight())
    state = {"weight": sparse.dense_weight(), "bias": torch.zeros(8)}
    with pytest.raises(RuntimeError, match='Unexpected key.*"bias"'):
        twin.load_state_dict(state)
    twin.load_state_dict(state, strict=False)


def test_threshold_rule_is_exact_at_the_threshold():
    layer = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0).view(-1)[:20] = 0  # exactly 20% zeros
    choice = select_kernel(layer, measure=False, min_sparsity=0.2)
    assert choice.is_sparse and choice.sparsity == 0.2


# --------------------------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_sparse_model_gives_the_dense_outputs(kind):
    model = pruned(kind)
    inputs = batch(kind)
    with torch.no_grad():
        dense = model(**inputs)
    report = model.to_sparse_inference(kernel="sparse")
    assert report.converted == [name.removesuffix(".weight") for name in model.masks]
    assert sparse_layers(model.model) == report.converted and not report.kept_dense
    assert not model.training and not model.model.training
    with torch.no_grad():
        sparse = model(**inputs)
    torch.testing.assert_close(sparse.logits, dense.logits, atol=TOLERANCE, rtol=0)
    for a, b in zip(hidden_states(kind, sparse), hidden_states(kind, dense), strict=True):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_keeps_working(kind):
    model = pruned(kind)
    model.config.pad_token_id = 0
    ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False}
    dense = model.generate(ids, **kwargs)
    model.to_sparse_inference(kernel="sparse")
    assert sparse_layers(model.model)
    assert torch.equal(model.generate(ids, **kwargs), dense)


def test_backward_through_a_sparse_layer_raises():
    model = pruned("bert")
    model.to_sparse_inference(kernel="sparse")
    output = model(**batch("bert"))  # grad mode on, embeddings trainable: the graph reaches the sparse layers
    with pytest.raises(RuntimeError, match="inference only"):
        output.logits.sum().backward()


def test_converted_model_saves_an_ordinary_checkpoint_and_restores(tmp_path):
    model = pruned("gpt2")
    inputs = batch("gpt2")
    dense_state = {k: v.clone() for k, v in model.model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.to_sparse_inference(kernel="sparse")
    state = model.model.state_dict()
    assert state.keys() == dense_state.keys()
    assert all(torch.equal(state[k], v) for k, v in dense_state.items())
    model.model.save_pretrained(tmp_path)
    reloaded = type(model.model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=TOLERANCE, rtol=0)
    restored = restore_dense_layers(model.model)
    assert len(restored) == len(model.masks) and not sparse_layers(model.model)
    assert all(isinstance(model.model.get_submodule(n), Conv1D) for n in restored)
    model.apply_masks_()  # parameters again
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("compression", [None, "sparse"])
def test_pruned_model_api_keeps_working_after_conversion(tmp_path, compression):
    model = pruned("bert")
    inputs = batch("bert")
    with torch.no_grad():
        expected = model(**inputs).logits
    before = model.sparsity_report().overall
    model.to_sparse_inference(kernel="sparse")
    assert sparse_layers(model.model)
    model.apply_masks_()
    assert model.sparsity_report().overall == before
    model.save_pretrained(tmp_path, compression=compression)
    reloaded = PrunedModel.from_pretrained(tmp_path).eval()
    assert reloaded.masks.keys() == model.masks.keys()
    assert all(torch.equal(reloaded.masks[name], mask) for name, mask in model.masks.items())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=TOLERANCE, rtol=0)


# ------------------------------------------------------------------------------------------ kernel selection
def test_forced_dense_and_sparse():
    model = pruned("bert")
    report = model.to_sparse_inference(kernel="dense")
    assert not report.converted and len(report.kept_dense) == len(model.masks)
    assert not sparse_layers(model.model)
    assert {c.reason for c in report.choices} == {"kernel='dense'"}
    report = model.to_sparse_inference(kernel="sparse", layers=["bert.encoder.layer.0.intermediate.dense"])
    assert report.converted == sparse_layers(model.model) == ["bert.encoder.layer.0.intermediate.dense"]
    assert report.choices[0].spec == KernelSpec("csr", selection.default_chunk_size())
    assert report.choices[0].speedup is None
    assert "1 of 1 layers sparse" in str(report) and "| layer |" in report.to_markdown()


def test_threshold_rule_without_measuring():
    for sparsity, expected in [(0.95, "csr"), (0.5, "dense")]:
        choice = select_kernel(masked_linear(64, 64, sparsity), "fc", measure=False, min_sparsity=0.9)
        assert choice.kernel == expected and choice.speedup is None
        assert "threshold rule" in choice.reason
    assert select_kernel(masked_linear(64, 64, 0.5), measure=False, min_sparsity=0.4).is_sparse


def test_measured_decision_takes_the_fastest_kernel_that_pays(monkeypatch):
    layer = masked_linear(64, 64)
    specs, _ = sparse_candidates(selection.weight_matrix(layer), Platform("cpu"), num_tokens=512)
    assert {s.chunk_size for s in specs} == {32, 64, 128, None} and len(specs) == 4
    assert specs[0].chunk_size == selection.default_chunk_size(512)
    fake = {"times": (1.0, [0.8, 0.4, 0.5, 2.0])}
    calls = []

    def measure(module, candidates, num_tokens, repeats):
        calls.append((module, list(candidates), num_tokens, repeats))
        return fake["times"]

    monkeypatch.setattr(selection, "measure_kernels", measure)
    choice = select_kernel(layer, "fc", num_tokens=512, repeats=3)
    assert calls == [(layer, specs, 512, 3)]
    assert choice.spec == specs[1] and choice.speedup == pytest.approx(2.5)
    fake["times"] = (1.0, [1.0, 0.95, 3.0, 1.2])  # best 1.05x < min_speedup 1.1
    choice = select_kernel(layer, "fc")
    assert not choice.is_sparse and choice.speedup == pytest.approx(1 / 0.95)
    assert "min_speedup" in choice.reason
    assert select_kernel(layer, "fc", min_speedup=1.0).spec == specs[1]


def test_measured_decision_on_real_timings_is_consistent():
    """No assertion on which kernel wins: only that the decision follows the measured speedup."""
    model = pruned("bert")
    report = model.to_sparse_inference(num_tokens=64, repeats=2, min_speedup=1.1)
    for choice in report.choices:
        assert choice.speedup is not None and choice.speedup > 0
        assert choice.is_sparse == (choice.speedup >= 1.1)
    assert sparse_layers(model.model) == report.converted
    with torch.no_grad():
        model(**batch("bert"))


def test_default_chunk_size_depends_on_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert selection.default_chunk_size(512) == selection.DEFAULT_CHUNK_SIZE
    assert selection.default_chunk_size(selection.DEFAULT_CHUNK_SIZE) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert selection.default_chunk_size(512) is None


def test_timing_gives_up_on_hopeless_candidates(monkeypatch):
    """A fake clock: each function advances it by its cost, so nothing here depends on real time."""
    clock, calls = [0.0], [0, 0, 0]
    monkeypatch.setattr(selection.time, "perf_counter", lambda: clock[0])

    def function(i: int, cost: float):
        def run() -> None:
            calls[i] += 1
            clock[0] += cost
        return run

    functions = [function(0, 1.0), function(1, 2.0), function(2, 5.0)]
    assert selection.time_interleaved(functions, repeats=4, give_up=3.0) == [1.0, 2.0, 5.0]
    assert calls == [5, 5, 2]  # warm-up + 4 rounds; the hopeless one: warm-up + the first round
    assert selection.time_interleaved(functions, repeats=2) == [1.0, 2.0, 5.0]
    assert calls == [8, 8, 5]


def test_few_tokens_measure_all_at_once_only():
    specs, _ = sparse_candidates(selection.weight_matrix(masked_linear(64, 64)), Platform("cpu"), num_tokens=16)
    assert specs == [KernelSpec("csr", None)]


def test_bsr_is_a_candidate_for_block_zeros():
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        blocks = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) >= 0.75
        layer.weight.mul_(blocks.repeat_interleave(8, 0).repeat_interleave(8, 1))
    specs, _ = sparse_candidates(selection.weight_matrix(layer), Platform("cpu"))
    chunk = selection.default_chunk_size()  # 32 tokens per call on one thread, all at once on more
    assert specs[0] == KernelSpec("bsr", chunk, (8, 8)) and KernelSpec("csr", chunk) in specs
    assert select_kernel(layer, kernel="sparse").kernel == "bsr"
    assert selection.bsr_blocksize(selection.weight_matrix(masked_linear(64, 64))) is None


def test_bfloat16_on_cpu_stays_dense():
    layer = masked_linear(64, 64, dtype=torch.bfloat16)
    for kernel in ("auto", "sparse"):
        choice = select_kernel(layer, kernel=kernel)
        assert not choice.is_sparse and "bfloat16" in choice.reason


@pytest.mark.parametrize("platform, dtype, shape, expected", [
    (Platform("cuda", (8, 0), True), torch.float16, (64, 64), "cusparselt"),
    (Platform("cuda", (9, 0), True), torch.bfloat16, (64, 64), "cusparselt"),
    (Platform("cuda", (8, 0), True), torch.float32, (64, 64), "cutlass"),
    (Platform("cuda", (8, 6), False), torch.float16, (64, 128), "cutlass"),
    (Platform("cuda", (8, 6), False), torch.float16, (64, 96), "multiples of (32, 64)"),
    (Platform("cuda", (8, 0), True), torch.float16, (40, 64), "multiples of (16, 16)"),
    (Platform("cuda", (7, 5), True), torch.float16, (64, 64), "compute capability 8.0"),
    (Platform("mps"), torch.float16, (64, 64), "no sparse kernel on mps"),
], ids=lambda v: str(v) if not isinstance(v, Platform) else f"{v.device_type}{v.capability}")
def test_two_four_selection_on_a_mocked_gpu(monkeypatch, platform, dtype, shape, expected):
    monkeypatch.setattr(selection, "platform_of", lambda device: platform)
    layer = two_four(*shape, dtype=dtype)
    specs, reason = sparse_candidates(selection.weight_matrix(layer), platform)
    if expected in selection.SEMI_STRUCTURED_SHAPES:
        assert specs == [KernelSpec("semi_structured", backend=expected)] and not reason
        for kernel, measure in [("sparse", True), ("auto", False)]:
            assert select_kernel(layer, kernel=kernel, measure=measure).spec == specs[0]
    else:
        assert not specs and expected in reason
        assert not select_kernel(layer, kernel="sparse").is_sparse


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 kernels need a CUDA GPU of compute capability 8.0 or newer")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_four_on_a_real_gpu_equals_the_dense_layer(dtype):
    layer = two_four(128, 256, dtype=dtype).cuda()
    with torch.no_grad():
        layer.weight.mul_(torch.randn_like(layer.weight))  # distinct values in the kept entries
    choice = select_kernel(layer, kernel="sparse")
    assert choice.spec.format == "semi_structured", choice.reason
    sparse = SparseLinear.from_module(layer, choice.spec)
    assert isinstance(sparse.weight, torch.sparse.SparseSemiStructuredTensor)
    x = torch.randn(3, 64, 256, dtype=dtype, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(sparse.to_dense_module().weight, layer.weight)


def test_two_four_needs_the_pattern(monkeypatch):
    monkeypatch.setattr(selection, "platform_of", lambda device: Platform("cuda", (8, 0), True))
    layer = two_four(64, 64)
    assert selection.is_two_four(selection.weight_matrix(layer))
    with torch.no_grad():
        layer.weight[0, 1] = 1.0  # 3 of the first 4 kept
    choice = select_kernel(layer, kernel="sparse")
    assert not choice.is_sparse and "2:4" in choice.reason


# ------------------------------------------------------------------------------------------------ bad input
def unchanged(model: PrunedModel, training: bool) -> None:
    assert not sparse_layers(model.model) and model.model.training == training


def test_model_without_masks_raises():
    model = PrunedModel(TINY_MODELS["bert"](), {})
    with pytest.raises(ValueError, match="no pruning masks"):
        model.to_sparse_inference()
    unchanged(model, True)


@pytest.mark.parametrize("layer, match", [
    ("bert.encoder.layer.0.attention.output.LayerNorm", "'bert.encoder.layer.0.attention.output.LayerNorm' is a "
                                                        "LayerNorm, not an nn.Linear or Conv1D"),
    ("bert.encoder.layer.7.output.dense", "'bert.encoder.layer.7.output.dense' is not a module"),
    ("bert.pooler.dense", "'bert.pooler.dense' has no pruning mask"),
])
def test_bad_layer_raises_and_changes_nothing(layer, match):
    model = pruned("bert")
    model.train()
    with pytest.raises(ValueError, match=match):
        model.to_sparse_inference(layers=["bert.encoder.layer.0.intermediate.dense", layer], kernel="sparse")
    unchanged(model, True)


@pytest.mark.parametrize("layers", [[1], [None], 5, "bert.pooler.dense"])
def test_layers_that_are_not_a_list_of_names_raise_and_change_nothing(layers):
    model = pruned("bert")
    model.train()
    with pytest.raises(ValueError, match="`layers` must be a list of module names"):
        model.to_sparse_inference(layers=layers, kernel="sparse")
    unchanged(model, True)


def test_a_tied_layer_is_refused():
    model = TINY_MODELS["gpt2"]()
    masks = {"lm_head.weight": torch.ones_like(model.lm_head.weight, dtype=torch.bool)}
    with pytest.raises(ValueError, match="'lm_head' shares its weight with transformer.wte.weight"):
        to_sparse_inference(model, masks, kernel="sparse")
    assert model.lm_head.weight is model.transformer.wte.weight


def test_converting_twice_names_the_converted_layer():
    model = pruned("gpt2")
    model.to_sparse_inference(kernel="sparse", layers=["transformer.h.0.mlp.c_fc"])
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc' is a SparseLinear \(already converted"):
        model.to_sparse_inference(kernel="sparse")
    assert sparse_layers(model.model) == ["transformer.h.0.mlp.c_fc"]


@pytest.mark.parametrize("options, field", [
    ({"kernel": "fast"}, "kernel"), ({"num_tokens": 0}, "num_tokens"), ({"repeats": 1.5}, "repeats"),
    ({"min_speedup": 0}, "min_speedup"), ({"min_sparsity": 2}, "min_sparsity"), ({"measure": "yes"}, "measure"),
    ({"layers": "bert.encoder.layer.0.output.dense"}, "layers"),
])
def test_bad_options_raise_and_change_nothing(options, field):
    model = pruned("bert")
    model.train()
    with pytest.raises(ValueError, match=f"`{field}`"):
        model.to_sparse_inference(**options)
    unchanged(model, True)


@pytest.mark.parametrize("wrapped", [True, False], ids=["PeftModel", "injected"])
def test_peft_models_must_be_merged_first(wrapped):
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    config = LoraConfig(r=2, target_modules=["query"])
    base = TINY_MODELS["bert"]()
    model = get_peft_model(base, config) if wrapped else inject_adapter_in_model(config, base)
    with pytest.raises(ValueError, match="merge_and_unload"):
        to_sparse_inference(model, {"bert.encoder.layer.0.output.dense.weight": torch.ones(32, 37, dtype=torch.bool)})
