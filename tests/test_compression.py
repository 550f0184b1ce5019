import json
import os

import numpy as np
import pytest
import torch
import transformers
from conftest import TinyClassificationDataset, tiny_bert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from testing_utils import RecordingHubApi, record_newest_checkpoint_at_rotation
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import hf_prune.compression.callback
from hf_prune import MagnitudePruningCallback, PrunedModel, Pruner, PruningConfig
from hf_prune.compression import (
    HuffmanTable,
    QuantizationCallback,
    QuantizedWeight,
    TrainedQuantizer,
    deep_compression_sizes,
    deep_format,
    dequantize,
    huffman_decode,
    huffman_encode,
    kmeans_1d,
    load_deep_compressed,
    quantize_weights,
    read_deep_compressed,
    save_deep_compressed,
)
from hf_prune.compression.huffman import BLOCK_SIZE, huffman_code_lengths
from hf_prune.compression.positions import GAP_LIMIT, encode_positions, gap_symbols, positions_from_gaps
from hf_prune.compression.quantization import centroid_gradients
from hf_prune.compression.sparse_format import read_sparse
from hf_prune.constants import MASKS_NAME, QUANTIZATION_STATE_NAME
from hf_prune.methods.han import HanConfig, HanPruningCallback
from hf_prune.methods.rpp import RPPCallback, RPPConfig
from hf_prune.serialization import load_masks


DTYPES = {np.uint8: 255, np.uint16: 65535, np.uint32: 2**32 - 1}


def round_trip(symbols: np.ndarray) -> tuple[bytes, HuffmanTable]:
    data, table = huffman_encode(symbols)
    parsed, size = HuffmanTable.from_bytes(table.to_bytes() + b"tail")
    assert size == len(table.to_bytes())
    decoded = huffman_decode(data, parsed)
    assert decoded.dtype == symbols.dtype
    np.testing.assert_array_equal(decoded, symbols.reshape(-1))
    return data, table


def pruned_bert(sparsity: float = 0.9) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=sparsity, schedule="oneshot"))
    pruner.update(0)
    return model, pruner.masks


def quantized_bert(bits: int = 4) -> tuple[torch.nn.Module, dict[str, QuantizedWeight]]:
    model, masks = pruned_bert()
    params = dict(model.named_parameters())
    return model, quantize_weights({name: params[name] for name in masks}, masks, bits)


def other_tensors(model: torch.nn.Module, quantized: dict) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if name not in quantized}


def batch(size: int = 8) -> dict[str, torch.Tensor]:
    data = TinyClassificationDataset(size)
    return {key: torch.stack([data[i][key] for i in range(size)]) for key in data[0]}


# --------------------------------------------------------------------------------------------------- Huffman
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(DTYPES, key=lambda d: np.dtype(d).itemsize)).flatmap(
    lambda dtype: st.lists(st.integers(0, DTYPES[dtype]), max_size=300).map(lambda v: np.array(v, dtype=dtype))))
def test_huffman_round_trips_any_stream(symbols):
    round_trip(symbols)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3 * BLOCK_SIZE), st.floats(0.05, 0.95), st.integers(0, 2**16))
def test_huffman_round_trips_skewed_multi_block_streams(length, p, seed):
    symbols = np.random.default_rng(seed).geometric(p, length).clip(max=255).astype(np.uint8)
    data, table = round_trip(symbols)
    _, counts = np.unique(symbols, return_counts=True)
    if len(counts) > 1:  # Huffman: entropy <= mean code length < entropy + 1
        probabilities = counts / length
        entropy = -(probabilities * np.log2(probabilities)).sum()
        mean_length = table.block_bits.astype(np.int64).sum() / length
        assert entropy - 1e-9 <= mean_length < entropy + 1


@pytest.mark.parametrize("symbols", [
    np.array([], dtype=np.uint8),
    np.full(5000, 7, dtype=np.uint16),
    np.array([2**32 - 1], dtype=np.uint32),
    np.arange(256, dtype=np.uint8),
    np.array([0, 1], dtype=np.uint64),
    np.repeat(np.arange(256, dtype=np.uint8), 9),
])
def test_huffman_edge_cases(symbols):
    data, table = round_trip(symbols)
    if len(np.unique(symbols)) < 2:
        assert data == b"" and len(table.length_counts) == 0
    if len(symbols) == 256 and len(np.unique(symbols)) == 256:
        assert len(data) == 256  # 256 equally likely symbols: 8 bits each


def test_huffman_code_lengths_are_limited_and_complete():
    fibonacci = [1, 1]
    while len(fibonacci) < 20:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    assert huffman_code_lengths(np.array(fibonacci)).max() == 19
    lengths = huffman_code_lengths(np.array(fibonacci), max_length=6)
    assert lengths.max() <= 6
    assert sum(2.0 ** -lengths) == 1.0
    with pytest.raises(ValueError, match="distinct symbols"):
        huffman_code_lengths(np.ones(5), max_length=2)


def test_huffman_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        huffman_encode(np.array([1, -2]))
    data, table = huffman_encode(np.array([0, 1, 1, 2, 2, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match="payload"):
        huffman_decode(data + b"\0", table)
    with pytest.raises(ValueError, match="truncated"):
        HuffmanTable.from_bytes(table.to_bytes()[:-1])
    incomplete = bytearray(table.to_bytes())
    incomplete[14] += 1  # one more code of length 1
    with pytest.raises(ValueError, match="prefix code|distinct"):
        HuffmanTable.from_bytes(bytes(incomplete))
    for bits in (0, 6 * 2 + 1):  # 6 symbols of 1..2-bit codes take 6..12 bits
        with pytest.raises(ValueError, match=f"block 0 of 6 symbols {bits} bits"):
            HuffmanTable(table.num_symbols, table.dtype, table.symbols, table.length_counts,
                         np.array([bits], dtype=np.uint16))


def test_gap_symbols_round_trip_with_fillers():
    mask = torch.zeros(3000, dtype=torch.bool)
    mask[[0, 1, 255, 256, 511, 512, 2999]] = True
    stream = gap_symbols(mask)
    assert list(stream[:4]) == [1, 1, 254, 1]
    assert (stream == 0).sum() == (2999 - 512 - 1) // GAP_LIMIT
    np.testing.assert_array_equal(positions_from_gaps(stream), mask.nonzero().squeeze(1).numpy())
    assert len(gap_symbols(torch.zeros(4, 4, dtype=torch.bool))) == 0


# ----------------------------------------------------------------------------------------------------- k-means
def test_kmeans_linear_init_nearest_assignment_and_means():
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0)) ** 3
    start, assignments = kmeans_1d(values, 16, max_iter=0)
    torch.testing.assert_close(start, torch.linspace(float(values.min()), float(values.max()), 16))
    centroids, assignments = kmeans_1d(values, 16, max_iter=500)
    assert centroids.dtype == torch.float32 and bool((centroids[1:] >= centroids[:-1]).all())
    assert values.min() <= centroids.min() and centroids.max() <= values.max()
    distances = (values[:, None] - centroids[None, :]).abs()
    assert bool((distances.gather(1, assignments[:, None]).squeeze(1) <= distances.min(1).values + 1e-7).all())
    for k in assignments.unique():  # converged: every centroid is the mean of its cluster
        torch.testing.assert_close(centroids[k], values[assignments == k].mean(), rtol=1e-5, atol=1e-6)


def test_kmeans_of_fewer_values_than_clusters_and_of_none():
    values = torch.tensor([0.5, -1.0, 2.0, 0.5, 0.51, 1e-8])  # 0.5 and 0.51 share a cell of the linear init
    centroids, assignments = kmeans_1d(values, 8)
    assert torch.equal(centroids[assignments], values) and bool((centroids[1:] >= centroids[:-1]).all())
    centroids, assignments = kmeans_1d(torch.zeros(0), 4)
    assert centroids.shape == (4,) and assignments.numel() == 0


@pytest.mark.parametrize("values", [
    [1.0000001192092896, 1.000000238418579],  # adjacent float32s: their float32 midpoint rounds onto the upper one
    [3e38, 3.4e38],  # their float32 sum overflows
    [-3.4e38, 3.4e38, 0.0],
])
def test_kmeans_represents_few_distinct_values_exactly_at_the_float32_limits(values):
    values = torch.tensor(values, dtype=torch.float32)
    centroids, assignments = kmeans_1d(values, 4)
    assert torch.equal(centroids[assignments], values)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_quantize_weights_of_a_pruned_bert(bits):
    model, quantized = quantized_bert(bits)
    params = dict(model.named_parameters())
    for name, q in quantized.items():
        assert q.bits == bits and q.centroids.numel() == 2**bits and q.indices.dtype == torch.uint8
        dense = dequantize(q)
        assert bool((dense[~q.mask] == 0).all())
        assert bool(torch.isin(dense[q.mask], q.centroids).all())
        kept = params[name].detach()[q.mask]
        nearest = (kept[:, None] - q.centroids[None, :]).abs().min(1).values
        assert bool(((dense[q.mask] - kept).abs() <= nearest + 1e-7).all())


def test_requantizing_shared_weights_is_exact():
    _, quantized = quantized_bert(3)
    for q in quantized.values():
        q.centroids.add_(torch.randn(8) * 1e-3)  # fine-tuned: no longer k-means' fixed point, maybe unsorted
    dense = {name: dequantize(q) for name, q in quantized.items()}
    again = quantize_weights(dense, {name: q.mask for name, q in quantized.items()}, 3)
    for name, q in again.items():
        assert torch.equal(dequantize(q), dense[name])


@pytest.mark.parametrize("bits", [0, 9, -1, True, 4.0, "4"])
def test_bits_outside_1_to_8_raise(bits):
    model, masks = pruned_bert()
    with pytest.raises(ValueError, match="`bits` must be an integer in 1..8"):
        quantize_weights(dict(model.named_parameters()), masks, bits)
    with pytest.raises(ValueError, match="`bits`"):
        QuantizationCallback(masks, bits=bits)


def test_quantize_needs_masks_matching_the_weights():
    model, masks = pruned_bert()
    weights = {name: param for name, param in model.named_parameters() if name in masks}
    with pytest.raises(ValueError, match="`masks` is empty"):
        quantize_weights(weights, {}, 4)
    with pytest.raises(ValueError, match="missing mask"):
        quantize_weights(weights, dict(list(masks.items())[1:]), 4)


# ------------------------------------------------------------------------------------- centroid fine-tuning
def test_centroid_gradients_hand_made():
    mask = torch.tensor([[True, False, True], [True, True, False]])
    quantized = QuantizedWeight(torch.tensor([-1.0, 0.0, 0.5, 1.0]), torch.tensor([3, 0, 3, 1], dtype=torch.uint8),
                                mask)
    grad = torch.tensor([[1.0, 100.0, 2.0], [4.0, 8.0, 100.0]])  # row-major kept: 1, 2, 4, 8
    torch.testing.assert_close(centroid_gradients(quantized, grad), torch.tensor([2.0, 8.0, 0.0, 5.0]))
    torch.testing.assert_close(dequantize(quantized), torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, 0.0]]))


def test_centroid_gradients_equal_autograd_through_shared_weights():
    model, quantized = quantized_bert(3)
    model.eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, q in quantized.items():
            params[name].copy_(dequantize(q))
    inputs = batch()
    model(**inputs).loss.backward()
    centroids = {name: q.centroids.clone().requires_grad_() for name, q in quantized.items()}
    shared = {name: torch.zeros(q.shape).masked_scatter(q.mask, centroids[name][q.indices.int()])
              for name, q in quantized.items()}
    torch.func.functional_call(model, shared, kwargs=inputs).loss.backward()
    for name, q in quantized.items():
        grouped = centroid_gradients(q, params[name].grad)
        torch.testing.assert_close(grouped, centroids[name].grad, rtol=1e-4, atol=1e-7)
        assert float(grouped.abs().sum()) > 0


def test_callback_update_rule_is_sgd_on_grouped_gradients():
    model, masks = pruned_bert()
    callback = QuantizationCallback(masks, bits=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    events = (None, TrainerState(), TrainerControl())
    callback.on_train_begin(*events, model=model)
    params = dict(model.named_parameters())
    model(**batch()).loss.backward()
    expected = {name: q.centroids - 0.05 * centroid_gradients(q, params[name].grad)
                for name, q in callback.quantized.items()}
    callback.on_pre_optimizer_step(*events, model=model, optimizer=optimizer)
    optimizer.step()
    callback.on_optimizer_step(*events, model=model)
    for name, q in callback.quantized.items():
        torch.testing.assert_close(q.centroids, expected[name])
        assert params[name].grad is None and torch.equal(params[name].detach(), dequantize(q))


@pytest.mark.parametrize("where", ["quantized weight", "other parameter"])
def test_a_step_with_non_finite_gradients_moves_no_centroid(where):
    """An fp16 overflow: the scaler skips the optimizer step (an inf in any parameter's gradient), and the
    centroids must not take it either."""
    model, masks = pruned_bert()
    quantizer = TrainedQuantizer(model, bits=2, learning_rate=0.05)
    quantizer.quantize_(masks)
    before = {name: q.centroids.clone() for name, q in quantizer.quantized.items()}
    params = dict(model.named_parameters())
    model(**batch()).loss.backward()
    first = next(iter(quantizer.quantized))
    if where == "quantized weight":
        params[first].grad[masks[first]] = float("inf")  # one overflowed entry in one layer
    else:
        other = next(name for name in params if name not in masks and params[name].grad is not None)
        params[other].grad.view(-1)[0] = float("nan")
    quantizer.step_()
    quantizer.write_weights_()
    for name, q in quantizer.quantized.items():
        assert torch.equal(q.centroids, before[name]) and params[name].grad is None
        assert torch.isfinite(params[name]).all()
    model.zero_grad()
    model(**batch()).loss.backward()  # the next, finite step moves them again
    quantizer.step_()
    assert any(not torch.equal(q.centroids, before[name]) for name, q in quantizer.quantized.items())


def test_with_load_best_model_at_end_quantized_is_the_codebook_of_the_loaded_weights(tmp_path):
    class EarliestIsBest(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_earliness"] = -state.global_step

    pruning = MagnitudePruningCallback(PruningConfig(final_sparsity=0.9, schedule="oneshot"))
    quantization = QuantizationCallback(pruning, bits=3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-3,
                             save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="earliness", greater_is_better=True, report_to="none",
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(64),
                      eval_dataset=TinyClassificationDataset(16, seed=1),
                      callbacks=[pruning, quantization, EarliestIsBest()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[name].detach(), dequantize(q)) for name, q in quantization.quantized.items())


@pytest.mark.parametrize("make_pruning", [
    lambda: MagnitudePruningCallback(PruningConfig(final_sparsity=0.9, schedule="cubic", end_step=8)),
    lambda: MagnitudePruningCallback(PruningConfig(final_sparsity=0.9, schedule="oneshot", start_step=2)),
    lambda: HanPruningCallback(HanConfig(quality=0.5, iterations=2, pruning_frequency=2)),
    lambda: RPPCallback(RPPConfig(final_sparsity=0.5, end_step=4)),
])
def test_a_pruning_callback_that_prunes_after_train_begin_is_refused_before_it_changes_anything(make_pruning):
    with pytest.raises(ValueError, match="pruning schedule is still running .* prunes after training begins"):
        QuantizationCallback(make_pruning(), bits=4)


def test_callback_refuses_missing_masks_and_running_schedules():
    model = tiny_bert()
    state = TrainerState(global_step=0, max_steps=10)
    with pytest.raises(ValueError, match="MagnitudePruningCallback has not begun training when QuantizationCallback "
                                         "needs its masks: put it before QuantizationCallback"):
        QuantizationCallback(MagnitudePruningCallback(PruningConfig(schedule="oneshot")), bits=4).on_train_begin(
            None, state, TrainerControl(), model=model)
    with pytest.raises(ValueError, match="`masks` is empty"):
        QuantizationCallback({}, bits=4).on_train_begin(None, state, TrainerControl(), model=model)
    pruning = MagnitudePruningCallback(PruningConfig(final_sparsity=0.9, schedule="cubic", end_step=8))
    pruning.on_train_begin(None, state, TrainerControl(), model=model)
    with pytest.raises(ValueError, match="still running"):
        QuantizationCallback(pruning, bits=4).on_train_begin(None, state, TrainerControl(), model=model)
    held = MagnitudePruningCallback(PruningConfig(final_sparsity=0.9, schedule="oneshot"))
    quantization = QuantizationCallback(held, bits=4)
    held.pruner = pruning.pruner  # as a resumed run's: the schedule has not ended at the checkpoint
    with pytest.raises(ValueError, match=r"still running when quantization starts \(sparsity 0\.\d+ of 0\.9\)"):
        quantization.on_train_begin(None, state, TrainerControl(), model=model)


def quantization_trainer(tmp_path, model, max_steps=6, **overrides):
    pruning = MagnitudePruningCallback(PruningConfig(final_sparsity=0.9, schedule="oneshot"))
    quantization = QuantizationCallback(pruning, bits=3)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=5e-3, weight_decay=0.1, save_steps=3, report_to="none", use_cpu=True,
                             seed=0, disable_tqdm=True, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=TinyClassificationDataset(64),
                      callbacks=[pruning, quantization])
    return trainer, pruning, quantization


def test_trainer_run_keeps_weights_on_centroids_and_pruned_weights_zero(tmp_path):
    _, initial = quantized_bert(3)  # the same tiny BERT, pruned and clustered as the callbacks will
    model = tiny_bert()
    trainer, pruning, quantization = quantization_trainer(tmp_path, model)
    trainer.train()
    params = dict(model.named_parameters())
    assert set(quantization.quantized) == set(pruning.masks)
    for name, q in quantization.quantized.items():
        weight = params[name].detach()
        assert torch.equal(q.mask, pruning.masks[name]) and torch.equal(q.indices, initial[name].indices)
        assert bool((weight[~q.mask] == 0).all()) and bool(torch.isin(weight[q.mask], q.centroids).all())
        assert torch.equal(weight, dequantize(q))
    assert any(not torch.equal(q.centroids, initial[name].centroids) for name, q in quantization.quantized.items())

    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-3")
    saved, others, metadata = read_deep_compressed(os.path.join(checkpoint, QUANTIZATION_STATE_NAME))
    assert metadata == {"global_step": 3} and others == {}
    resumed, _, resumed_quantization = quantization_trainer(tmp_path, tiny_bert())
    resumed.train(resume_from_checkpoint=checkpoint)
    for name, q in resumed_quantization.quantized.items():
        assert torch.equal(q.indices, saved[name].indices) and torch.equal(q.mask, saved[name].mask)


def test_resuming_a_checkpoint_outside_output_dir_refuses_the_codebook_of_another_run(tmp_path):
    # output_dir holds a checkpoint-2 of another run: find_checkpoint_file reads its codebook, not the resumed one's
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.9, schedule="oneshot"))
    pruner.update(0)

    def trainer(output_dir, learning_rate, max_steps):
        args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8,
                                 learning_rate=learning_rate, save_steps=2, report_to="none", use_cpu=True, seed=0,
                                 disable_tqdm=True)
        return Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(64),
                       callbacks=[QuantizationCallback(dict(pruner.masks), bits=3)])

    trainer(tmp_path / "a", 5e-3, 2).train()
    trainer(tmp_path / "b", 5e-1, 2).train()
    resumed = trainer(tmp_path / "b", 5e-3, 3)
    with pytest.raises(ValueError, match="quantization_state.safetensors is not the codebook of the checkpoint the "
                                         "Trainer loaded .*weights, such as .* are not its values"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 2  # refused before any step


def test_a_resume_that_rebuilds_the_callbacks_from_their_state_takes_the_rebuilt_pruning_callbacks_masks(tmp_path):
    trainer, pruning, quantization = quantization_trainer(tmp_path, tiny_bert())
    trainer.train()
    resumed, _, given = quantization_trainer(tmp_path, tiny_bert(), restore_callback_states_from_checkpoint=True)
    resumed.train(resume_from_checkpoint=os.path.join(trainer.args.output_dir, "checkpoint-3"))
    rebuilt = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, QuantizationCallback)]
    assert len(rebuilt) == 1 and rebuilt[0] is not given and rebuilt[0].source is None and rebuilt[0].bits == 3
    assert resumed.state.global_step == 6
    for name, q in rebuilt[0].quantized.items():  # the same run, resumed: the same codebook at its end
        assert torch.equal(q.mask, pruning.masks[name]) and torch.equal(q.indices, quantization.quantized[name].indices)


@pytest.mark.parametrize("with_pruning", [False, True], ids=["masks given", "RPPCallback"])
def test_a_rebuilt_callback_resumes_whatever_gave_it_its_masks(tmp_path, with_pruning):
    # rebuilt from its state, it has no masks, and the Trainer adds RPPCallback after it (name order)
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.9, schedule="oneshot"))
    pruner.update(0)
    PrunedModel(model, pruner.masks, RPPConfig(final_sparsity=0.9, schedule="oneshot")).save_pretrained(
        tmp_path / "pruned")

    def trainer(max_steps):
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8,
                                 learning_rate=5e-3, save_steps=2, report_to="none", use_cpu=True, seed=0,
                                 disable_tqdm=True, restore_callback_states_from_checkpoint=True)
        callbacks = [QuantizationCallback(dict(pruner.masks), bits=3)]
        if with_pruning:
            callbacks = [RPPCallback.from_pretrained(tmp_path / "pruned"), QuantizationCallback(bits=3)]
        return Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(64), callbacks=callbacks)

    trainer(4).train()
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    [rebuilt] = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, QuantizationCallback)]
    assert resumed.state.global_step == 4 and rebuilt.source is None and len(rebuilt.quantized) > 0


def test_the_masks_default_to_the_trainers_pruning_callback_and_without_one_say_so(tmp_path):
    trainer, pruning, quantization = quantization_trainer(tmp_path, tiny_bert(), max_steps=2)
    quantization.source = None  # QuantizationCallback(bits=3)
    trainer.train()
    assert set(quantization.quantized) == set(pruning.masks)
    alone = Trainer(model=tiny_bert(), args=trainer.args, train_dataset=TinyClassificationDataset(8),
                    callbacks=[QuantizationCallback(bits=3)])
    with pytest.raises(ValueError, match="no `masks` and its Trainer no pruning callback"):
        alone.train()


def test_a_pruning_callback_after_quantization_callback_is_named_as_coming_after_it(tmp_path):
    pruning = MagnitudePruningCallback(PruningConfig(final_sparsity=0.5, schedule="oneshot"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TinyClassificationDataset(8),
                      callbacks=[QuantizationCallback(bits=3), pruning])
    with pytest.raises(ValueError, match="MagnitudePruningCallback comes after QuantizationCallback in the "
                                         "Trainer's callbacks: put it before"):
        trainer.train()


def test_a_checkpoint_holds_its_codebook_before_save_total_limit_deletes_the_older_ones(tmp_path, monkeypatch):
    seen = record_newest_checkpoint_at_rotation(monkeypatch, QUANTIZATION_STATE_NAME)  # killed there: complete?
    written = []
    monkeypatch.setattr(hf_prune.compression.callback, "save_deep_compressed", lambda path, *args: (
        written.append(os.path.basename(os.path.dirname(path))), save_deep_compressed(path, *args)))
    trainer, _, _ = quantization_trainer(tmp_path, tiny_bert(), save_total_limit=1)
    trainer.train()
    assert seen == [("checkpoint-3", True), ("checkpoint-6", True)]
    assert written == ["checkpoint-3", "checkpoint-6"], "each checkpoint's codebook written once"


def test_checkpoints_pushed_to_the_hub_carry_the_clusters(tmp_path, monkeypatch):
    hub = RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer, _, _ = quantization_trainer(tmp_path, tiny_bert(), push_to_hub=True, hub_model_id="user/deep",
                                         hub_strategy="checkpoint")
    trainer.train()
    checkpoints = [files for path, files in hub.uploads if path == "last-checkpoint"]
    assert len(checkpoints) == 2 and all({QUANTIZATION_STATE_NAME, MASKS_NAME} <= files for files in checkpoints)


# ------------------------------------------------------------------------------------------------ file format
def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, quantized = quantized_bert(4)
    others = other_tensors(model, quantized)
    path = tmp_path / "deep.safetensors"
    save_deep_compressed(path, quantized, others, {"bits": 4})
    dense, loaded_others = load_deep_compressed(path)
    assert set(dense) == set(quantized) and set(loaded_others) == set(others)
    for name, q in quantized.items():
        assert dense[name].dtype == torch.float32 and torch.equal(dense[name], dequantize(q))
    for name, tensor in others.items():
        assert torch.equal(loaded_others[name], tensor)
    read, _, metadata = read_deep_compressed(path)
    assert metadata == {"bits": 4}
    for name, q in quantized.items():
        assert torch.equal(read[name].mask, q.mask) and torch.equal(read[name].indices, q.indices)
        assert torch.equal(read[name].centroids, q.centroids)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_save_refuses_a_tensor_stored_twice(tmp_path):
    model, quantized = quantized_bert(2)
    name = next(iter(quantized))
    with pytest.raises(ValueError, match="both quantized"):
        save_deep_compressed(tmp_path / "x.safetensors", quantized, {name: torch.zeros(1)})


def test_compressed_size_at_90_percent_sparsity_and_4_bits(tmp_path):
    """Huffman is optimal among prefix codes, so each stream takes at most the bits of a fixed-width code over
    its alphabet: 4 bits per index, 8 per gap symbol. A table takes 14 header bytes, 4 per code length (a
    Huffman tree over d symbols is at most d - 1 deep), 1 per distinct symbol and 2 per block."""
    model, quantized = quantized_bert(4)
    path = tmp_path / "deep.safetensors"
    save_deep_compressed(path, quantized, {})
    sizes = deep_compression_sizes(path)

    def table_bytes(symbols: np.ndarray) -> int:
        distinct = len(np.unique(symbols))
        return 0 if distinct < 2 else 14 + 4 * (distinct - 1) + distinct + 2 * -(-len(symbols) // BLOCK_SIZE)

    bound, dense = 0, 0
    for q in quantized.values():
        gaps = gap_symbols(q.mask)
        bound += 4 * 16 + -(-4 * q.indices.numel() // 8) + 14 + table_bytes(q.indices.numpy())
        bound += len(gaps) + 14 + table_bytes(gaps)
        dense += 4 * q.mask.numel()
    assert sizes.dense_bytes == dense
    assert sizes.compressed_bytes <= bound
    assert sizes.codebook_bytes == 64 * len(quantized)
    assert sizes.ratio >= dense / bound > 7
    with safe_open(str(path), framework="pt") as f:
        assert sum(f.get_tensor(name).numel() for name in quantized) == sizes.compressed_bytes


def corrupt_variants(path, quantized_names):
    data = open(path, "rb").read()
    for size in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        yield f"truncated to {size}", data[:size]
    header_size = int.from_bytes(data[:8], "little")
    entries = json.loads(data[8:8 + header_size])
    inside_blobs = [8 + header_size + sum(entries[name]["data_offsets"]) // 2 for name in quantized_names]
    for position in list(range(0, len(data), max(1, len(data) // 40))) + inside_blobs + [len(data) - 1]:
        flipped = bytearray(data)
        flipped[position] ^= 0xFF
        yield f"byte {position} flipped", bytes(flipped)


def test_corrupt_files_raise_value_error(tmp_path):
    model, quantized = quantized_bert(4)
    path = tmp_path / "deep.safetensors"
    save_deep_compressed(path, quantized, other_tensors(model, quantized))
    bad = tmp_path / "bad.safetensors"
    for what, data in corrupt_variants(path, list(quantized)):
        bad.write_bytes(data)
        with pytest.raises(ValueError):
            load_deep_compressed(bad)
            pytest.fail(f"{what}: no ValueError")


def test_wrong_format_tag_and_checksum_raise(tmp_path):
    model, quantized = quantized_bert(2)
    path = str(tmp_path / "deep.safetensors")
    save_deep_compressed(path, quantized, other_tensors(model, quantized))
    with safe_open(path, framework="pt") as f:
        header = f.metadata()
    tensors = load_file(path)
    save_file(tensors, path + ".tag", {**header, "format": "hf_prune.sparse.v1"})
    with pytest.raises(ValueError, match="format 'hf_prune.sparse.v1'"):
        load_deep_compressed(path + ".tag")
    name = next(iter(quantized))
    tensors[name] = tensors[name].clone()
    tensors[name][-1] ^= 1
    save_file(tensors, path + ".sum", header)
    with pytest.raises(ValueError, match=f"checksum mismatch for \\['{name}'\\]"):
        load_deep_compressed(path + ".sum")
    save_file(tensors, path + ".head", {**header, "metadata": '{"bits": 3}'})
    with pytest.raises(ValueError, match="header does not match"):
        load_deep_compressed(path + ".head")


def test_consistent_checksums_over_an_undecodable_layer_raise(tmp_path):
    model, quantized = quantized_bert(2)
    path = str(tmp_path / "deep.safetensors")
    save_deep_compressed(path, quantized, {})
    with safe_open(path, framework="pt") as f:
        header = f.metadata()
    layers = json.loads(header["layers"])
    name = next(iter(layers))
    layers[name]["kept"] += 1
    header["layers"] = json.dumps(layers)
    header["header_sha256"] = deep_format._header_digest(header)
    save_file(load_file(path), path, header)
    with pytest.raises(ValueError, match=f"'{name}' does not decode"):
        read_deep_compressed(path)


@pytest.mark.parametrize("layers, message", [
    ([], "`layers` must be a JSON object"),
    ({"w": {"shape": [4], "bits": 2, "kept": 1, "sections": [-64, -5]}}, r"`layers\['w'\].sections` must list"),
    ({"w": {"shape": [4], "bits": 2, "kept": 1, "sections": [2 ** 70, 1]}}, r"`layers\['w'\].sections` must list"),
    ({"w": "x"}, r"`layers\['w'\]` must be a JSON object"),
])
def test_deep_compression_sizes_checks_the_header_as_reading_does(tmp_path, layers, message):
    _, quantized = quantized_bert(2)
    path = str(tmp_path / "deep.safetensors")
    save_deep_compressed(path, quantized, {}, store_positions=False)
    assert deep_compression_sizes(path).index_bytes > 0  # positions in the masks: no masks needed for the sizes
    header = safetensors_header(path)
    header["layers"] = json.dumps(layers)
    header["header_sha256"] = deep_format._header_digest(header)
    save_file(load_file(path), path, header)
    with pytest.raises(ValueError, match=message):
        deep_compression_sizes(path)
    save_file({"x": torch.zeros(1)}, path, {"format": "other"})
    with pytest.raises(ValueError, match="format 'other'.* not a deep-compressed"):
        deep_compression_sizes(path)


# ------------------------------------------------------------------------ quantizer arguments (issue 16, item 9)
@pytest.mark.parametrize("kwargs, field, accepted", [
    ({"learning_rate": float("nan")}, "learning_rate", "> 0"),
    ({"learning_rate": float("inf")}, "learning_rate", "> 0"),
    ({"learning_rate": -float("inf")}, "learning_rate", "> 0"),
    ({"learning_rate": -1.0}, "learning_rate", "> 0"),
    ({"learning_rate": 0.0}, "learning_rate", "> 0"),
    ({"learning_rate": True}, "learning_rate", "> 0"),
    ({"learning_rate": "0.1"}, "learning_rate", "> 0"),
    ({"max_iter": 0}, "max_iter", ">= 1"),
    ({"max_iter": -5}, "max_iter", ">= 1"),
    ({"max_iter": 2.5}, "max_iter", ">= 1"),
    ({"max_iter": None}, "max_iter", ">= 1"),
])
def test_quantizer_arguments_are_checked_before_training(kwargs, field, accepted):
    model, masks = pruned_bert()
    for make in (lambda: QuantizationCallback(masks, **kwargs), lambda: TrainedQuantizer(model, **kwargs)):
        with pytest.raises(ValueError, match=f"`{field}`") as error:
            make()
        assert repr(kwargs[field]) in str(error.value) and accepted in str(error.value)


@pytest.mark.parametrize("masks", [42, "masks", [torch.ones(2, dtype=torch.bool)]], ids=["int", "str", "list"])
def test_quantization_callback_refuses_masks_that_are_not_masks(masks):
    with pytest.raises(ValueError, match=r"`masks` must be a dict of bool masks, a MagnitudePruningCallback or a "
                                         r"PrunedModel \(or None: the Trainer's pruning callback\); got "
                                         + type(masks).__name__):
        QuantizationCallback(masks)


def test_quantization_callback_accepts_good_arguments_and_trains_finite():
    model, masks = pruned_bert()
    callback = QuantizationCallback(masks, bits=2, learning_rate=1e-3, max_iter=1)
    assert (callback.bits, callback.learning_rate, callback.max_iter) == (2, 1e-3, 1)
    events = (None, TrainerState(), TrainerControl())
    callback.on_train_begin(*events, model=model)
    model(**batch()).loss.backward()
    callback.on_pre_optimizer_step(*events, model=model, optimizer=None)
    callback.on_optimizer_step(*events, model=model)
    assert all(bool(torch.isfinite(q.centroids).all()) for q in callback.quantized.values())
    assert bool(torch.isfinite(model(**batch()).loss))


# ------------------------------------------------------------------- bounded reading (issue 16, items 5 and 13)
def saved_deep_folder(tmp_path):
    """A tiny BERT saved with compression="deep", without the record of its files (as an attacker would drop it)."""
    model, masks = pruned_bert()
    PrunedModel(model, masks, PruningConfig(final_sparsity=0.9, schedule="oneshot")).save_pretrained(
        tmp_path, compression="deep")
    config = json.loads((tmp_path / "pruning_config.json").read_text())
    config.pop("files")
    (tmp_path / "pruning_config.json").write_text(json.dumps(config))
    return masks


def rewrite_layer(path, name, shape, kept, bits=4):
    """Replaces the layer `name` of a deep file by `kept` entries of one cluster in `shape`: single-symbol Huffman
    streams need no payload, so a few bytes claim any size; checksums and header digest recomputed."""
    header, tensors = safetensors_header(path), load_file(str(path))
    layers, checksums = json.loads(header["layers"]), json.loads(header["checksums"])
    single = HuffmanTable(kept, np.dtype(np.uint8), np.zeros(1, dtype=np.uint8), np.zeros(0, dtype=np.uint32),
                          np.zeros(0, dtype=np.uint16)).to_bytes()
    sections = [np.zeros(2 ** bits, dtype="<f4").tobytes(), single]
    if header.get("positions") == "gaps":
        sections.append(HuffmanTable(kept, np.dtype(np.uint8), np.ones(1, dtype=np.uint8),
                                     np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint16)).to_bytes())
    tensors[name] = torch.frombuffer(bytearray(b"".join(sections)), dtype=torch.uint8)
    layers[name] = {"shape": list(shape), "bits": bits, "kept": kept, "sections": [len(s) for s in sections]}
    checksums[name] = deep_format._digest(name, tensors[name])
    header.update(layers=json.dumps(layers), checksums=json.dumps(checksums))
    header["header_sha256"] = deep_format._header_digest(header)
    save_file(tensors, str(path), header)
    return os.path.getsize(path)


def safetensors_header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def peak_numpy_bytes(function) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        function()
    except ValueError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


CLAIMS = [((6000, 5000), 30_000_000), ((32, 32), 1024)]  # far too large; the right shape but more kept entries


@pytest.mark.parametrize("shape, kept", CLAIMS, ids=["huge", "kept"])
def test_a_crafted_deep_file_is_refused_before_anything_is_decoded(tmp_path, shape, kept):
    from hf_prune import PrunedModel
    from hf_prune.constants import DEEP_COMPRESSED_WEIGHTS_NAME

    masks = saved_deep_folder(tmp_path)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    path = tmp_path / DEEP_COMPRESSED_WEIGHTS_NAME
    assert rewrite_layer(path, name, shape, kept) < 60_000
    message = f"does not match pruning_masks.safetensors: {name} has shape \\[{shape[0]}, {shape[1]}\\] and {kept}"
    with pytest.raises(ValueError, match=message):
        PrunedModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        read_deep_compressed(path, masks)
    assert peak_numpy_bytes(lambda: PrunedModel.from_pretrained(tmp_path)) < 8_000_000


def test_a_crafted_self_contained_deep_file_is_bounded_by_the_masks(tmp_path):
    model, quantized = quantized_bert(4)
    path = tmp_path / "deep.safetensors"
    save_deep_compressed(path, quantized, {})  # positions in the file, as QuantizationCallback's checkpoints
    name = next(iter(quantized))
    rewrite_layer(path, name, (6000, 5000), 30_000_000)
    masks = {n: q.mask for n, q in quantized.items()}
    with pytest.raises(ValueError, match=f"{name} has shape \\[6000, 5000\\] and 30000000 kept entries"):
        read_deep_compressed(path, masks)
    assert peak_numpy_bytes(lambda: read_deep_compressed(path, masks)) < 4_000_000


def test_a_crafted_gap_coded_masks_file_is_refused_before_decoding(tmp_path):
    masks = saved_deep_folder(tmp_path)
    path = tmp_path / "pruning_masks.safetensors"
    header, tensors = safetensors_header(path), load_file(str(path))
    name = next(iter(masks))
    shapes, kept = {n: list(m.shape) for n, m in masks.items()}, {n: int(m.sum()) for n, m in masks.items()}
    shapes[name], kept[name] = [6000, 5000], 30_000_000
    tensors = {n: torch.frombuffer(bytearray(encode_positions(m)), dtype=torch.uint8)
               for n, m in masks.items()}
    tensors[name] = torch.frombuffer(bytearray(HuffmanTable(
        30_000_000, np.dtype(np.uint8), np.ones(1, dtype=np.uint8), np.zeros(0, dtype=np.uint32),
        np.zeros(0, dtype=np.uint16)).to_bytes()), dtype=torch.uint8)
    save_file(tensors, str(path), {**header, "format": "hf_prune.gapmask.v1", "shapes": json.dumps(shapes),
                                   "kept": json.dumps(kept)})
    message = f"pruning_masks.safetensors: Masks do not match the model: mask {name} has shape \\(6000, 5000\\)"
    with pytest.raises(ValueError, match=message):
        PrunedModel.from_pretrained(tmp_path)
    expected = {n: tuple(p.shape) for n, p in tiny_bert().named_parameters()}
    with pytest.raises(ValueError, match=message):
        load_masks(path, expected)
    assert peak_numpy_bytes(lambda: load_masks(path, expected)) < 1_000_000
    shapes[name] = list(masks[name].shape)
    save_file(tensors, str(path), {**header, "format": "hf_prune.gapmask.v1", "shapes": json.dumps(shapes),
                                   "kept": json.dumps(kept)})
    with pytest.raises(ValueError, match=f"`kept\\['{name}'\\]` must be an integer in 0..1024"):
        load_masks(path, expected)


@pytest.mark.parametrize("field, value, message", [
    ("shape", [32, -32], "shape` must be a non-empty list of positive integers"),
    ("shape", [32.0, 32], "shape` must be a non-empty list of positive integers"),
    ("bits", 0, "bits` must be an integer in 1..8"),
    ("kept", -1, "kept` must be an integer in 0..1024"),
    ("sections", [64], "sections` must list 2 byte counts"),
    ("sections", None, "sections` must list 2 byte counts"),
])
def test_malformed_deep_header_fields_are_value_errors_naming_the_field(tmp_path, field, value, message):
    model, quantized = quantized_bert(4)
    path = tmp_path / "deep.safetensors"
    masks = {n: q.mask for n, q in quantized.items()}
    save_deep_compressed(path, quantized, {}, store_positions=False)
    header = safetensors_header(path)
    layers = json.loads(header["layers"])
    name = "bert.encoder.layer.0.attention.self.query.weight"
    layers[name][field] = value
    header["layers"] = json.dumps(layers)
    header["header_sha256"] = deep_format._header_digest(header)
    save_file(load_file(str(path)), str(path), header)
    with pytest.raises(ValueError, match=f"deep.safetensors is corrupt: `layers\\['{name}'\\].{message}"):
        read_deep_compressed(path, masks)


def test_a_file_without_its_positions_needs_the_masks_and_sizes_count_them_out(tmp_path):
    model, quantized = quantized_bert(4)
    masks = {n: q.mask for n, q in quantized.items()}
    path = tmp_path / "deep.safetensors"
    save_deep_compressed(path, quantized, {}, store_positions=False)
    with pytest.raises(ValueError, match="keeps the kept positions in the masks saved beside it"):
        read_deep_compressed(path)
    loaded, _, _ = read_deep_compressed(path, masks)
    for name, q in quantized.items():
        assert torch.equal(dequantize(loaded[name]), dequantize(q))
    sizes = deep_compression_sizes(path)
    save_deep_compressed(tmp_path / "with_gaps.safetensors", quantized, {})
    with_gaps = deep_compression_sizes(tmp_path / "with_gaps.safetensors")
    assert sizes.position_bytes == 0 and with_gaps.position_bytes > 0
    assert sizes.index_bytes == with_gaps.index_bytes and sizes.codebook_bytes == with_gaps.codebook_bytes
    other = {n: m.clone() for n, m in masks.items()}
    other[name][0] = ~other[name][0]
    with pytest.raises(ValueError, match=f"does not match pruning_masks.safetensors: {name} has shape"):
        read_deep_compressed(path, other)
    with pytest.raises(ValueError, match=f"the positions of '{name}' differ"):
        read_deep_compressed(tmp_path / "with_gaps.safetensors",
                             {**masks, name: masks[name].flatten().roll(1).reshape(masks[name].shape)})


def test_gap_coded_masks_round_trip_and_are_small_at_high_sparsity(tmp_path):
    from hf_prune.serialization import load_masks, save_masks

    generator = torch.Generator().manual_seed(0)
    masks = {"a.weight": torch.rand(384, 1536, generator=generator) > 0.9,
             "b.weight": torch.zeros(7, 3, dtype=torch.bool), "c.weight": torch.ones(300, dtype=torch.bool)}
    for encoding in ("gaps", "smallest", "bitmask"):
        save_masks(masks, tmp_path / f"{encoding}.safetensors", {"x": 1}, encoding=encoding)
        loaded = load_masks(tmp_path / f"{encoding}.safetensors")
        assert all(torch.equal(loaded[n], m) for n, m in masks.items())
    gaps, bitmask = (os.path.getsize(tmp_path / f"{e}.safetensors") for e in ("gaps", "bitmask"))
    assert gaps < 0.6 * bitmask  # ~0.47 bits of entropy per weight at 10% kept, plus Huffman's overhead
    assert os.path.getsize(tmp_path / "smallest.safetensors") == gaps
    with pytest.raises(ValueError, match="`encoding` must be one of 'bitmask', 'gaps', 'smallest'; got 'zip'"):
        save_masks(masks, tmp_path / "x.safetensors", encoding="zip")


@pytest.mark.parametrize("read, file_name", [
    (lambda folder, masks: deep_compression_sizes(folder), "deep_compressed_weights.safetensors"),
    (lambda folder, masks: read_deep_compressed(folder, masks), "deep_compressed_weights.safetensors"),
    (lambda folder, masks: load_masks(folder), MASKS_NAME),
    (lambda folder, masks: read_sparse(folder, masks), "pruned_weights.safetensors"),
])
def test_a_folder_given_for_a_file_is_named_with_the_file_to_pass(tmp_path, read, file_name):
    masks = saved_deep_folder(tmp_path)  # the docs speak of the sizes "of a save_pretrained folder"
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder, not a .*: pass the file "
                                         rf"\({os.path.join(tmp_path, file_name)} in a saved folder\)"):
        read(tmp_path, masks)  # it said "No such device (os error 19)"
