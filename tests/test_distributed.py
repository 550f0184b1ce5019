"""Multi-process pruning on CPU with gloo: DDP training through torchrun, the rank-agreement check, and the radix
select over row-sharded weights (plain row blocks), and `MagnitudePruningCallback` on FSDP2 `fully_shard` shards."""

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TinyClassificationDataset, tiny_bert
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerControl, TrainerState

from hf_prune import MagnitudePruningCallback, PrunedModel, Pruner, PruningConfig, RegularizationCallback
from hf_prune.constants import MASKS_NAME
from hf_prune.criteria import MagnitudeCriterion
from hf_prune.distributed import (
    ProcessGroupReduce,
    check_ranks_agree,
    check_thresholds_agree,
    is_distributed,
    masks_fingerprint,
)
from hf_prune.masks import update_masks_
from hf_prune.methods.rpp import RPPCallback, RPPConfig
from hf_prune.serialization import load_masks
from hf_prune.targets import find_targets


pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WORLD_SIZE = 2
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).with_name("distributed_script.py")
SAVED_FILES = ["README.md", "config.json", "model.safetensors", "pruning_config.json", MASKS_NAME]
SHARDED_EVENTS = {"class-blind": (0.3, 0.6), "class-uniform": (0.5,), "class-distribution": (0.55,)}


def single_process_env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": pythonpath}


def read_rank(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Masks, targeted weights and metadata that distributed_script.py wrote for `rank`."""
    path = folder / f"rank{rank}.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    masks = {k.removeprefix("mask/"): v for k, v in tensors.items() if k.startswith("mask/")}
    weights = {k.removeprefix("weight/"): v for k, v in tensors.items() if k.startswith("weight/")}
    return masks, weights, metadata


def torchrun(folder: Path, *script_args: str, nproc: int = WORLD_SIZE) -> subprocess.CompletedProcess:
    """distributed_script.py under `torchrun --standalone --nproc_per_node 2` (CPU, gloo, unless sharded)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(SCRIPT), "--output_dir", str(folder), *script_args]
    return subprocess.run(command, env=single_process_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    result = torchrun(folder)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return folder


def test_ddp_ranks_train_on_identical_sparse_masks(ddp_run):
    (masks0, weights0, meta0), (masks1, weights1, meta1) = (read_rank(ddp_run, r) for r in range(WORLD_SIZE))
    assert meta0["world_size"] == meta1["world_size"] == str(WORLD_SIZE)
    assert meta0["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert masks0.keys() == masks1.keys() and masks0
    for name, mask in masks0.items():
        assert torch.equal(mask, masks1[name]), name
        assert torch.equal(weights0[name], weights1[name]), name
        assert (weights0[name][~mask] == 0).all(), name
    total = sum(m.numel() for m in masks0.values())
    assert sum(int((~m).sum()) for m in masks0.values()) == round(0.7 * total)


def test_ddp_pruned_model_and_checkpoint_are_written_by_the_main_process_only(ddp_run):
    masks, weights, meta0 = read_rank(ddp_run, 0)
    _, _, meta1 = read_rank(ddp_run, 1)
    folder = ddp_run / "pruned"
    assert json.loads(meta1["seen_after_own_save"]) == []  # rank 1 saved first and wrote nothing
    assert json.loads(meta0["seen_after_own_save"]) == sorted(SAVED_FILES) == sorted(os.listdir(folder))
    loaded = PrunedModel.from_pretrained(folder)
    params = dict(loaded.model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(loaded.masks[name], mask) and torch.equal(params[name], weights[name]), name
    checkpoint_masks = load_masks(ddp_run / "trainer" / "checkpoint-6" / MASKS_NAME)
    assert all(torch.equal(checkpoint_masks[name], mask) for name, mask in masks.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Trainer shards (FSDP, DeepSpeed) only on accelerators")
@pytest.mark.parametrize("sharding", ["fsdp1", "fsdp2", "zero3"])
def test_trainer_with_sharded_weights_prunes_shards_and_saves_full_masks(tmp_path, sharding):
    """The real Trainer under FSDP1, FSDP2 or DeepSpeed ZeRO-3, on up to 2 GPUs (one process per GPU)."""
    if sharding == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    world_size = min(WORLD_SIZE, torch.cuda.device_count())
    result = torchrun(tmp_path, "--sharding", sharding, nproc=world_size)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    (masks0, weights0, meta0), *others = (read_rank(tmp_path, r) for r in range(world_size))
    assert meta0["deepspeed" if sharding == "zero3" else "fsdp"] == "True"
    local_shapes = json.loads(meta0["mask_shapes"])
    if sharding != "fsdp2":  # runs of the flattened weights: 1-D masks
        assert all(len(shape) == 1 for shape in local_shapes.values())
    total = sum(m.numel() for m in masks0.values())
    assert sum(int((~m).sum()) for m in masks0.values()) == round(0.7 * total)
    loaded = PrunedModel.from_pretrained(tmp_path / "pruned")
    params = dict(loaded.model.named_parameters())
    for name, mask in masks0.items():
        assert all(torch.equal(mask, masks[name]) and torch.equal(weights0[name], weights[name])
                   for masks, weights, _ in others), name
        assert (weights0[name][~mask] == 0).all() and torch.equal(loaded.masks[name], mask), name
        assert torch.equal(params[name], weights0[name]), name
    checkpoint_masks = load_masks(tmp_path / "trainer" / "checkpoint-6" / MASKS_NAME)
    assert all(torch.equal(mask, masks0[name]) for name, mask in checkpoint_masks.items())


def test_ddp_training_stops_when_one_rank_prunes_differently(tmp_path):
    result = torchrun(tmp_path, "--skew_rank", "1")
    assert result.returncode != 0
    assert "RuntimeError: Pruning masks differ across ranks at step 2 in 1 of" in result.stdout + result.stderr
    assert not list(tmp_path.glob("rank*.safetensors"))  # no rank got past training


def integer_weights() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The targeted weights of the tiny BERT rounded to integers (|w| <= ~8: thousands of exact ties, many zeros),
    and their weight classes."""
    model = tiny_bert()
    params = dict(model.named_parameters())
    targets = find_targets(model, PruningConfig())
    weights = {t.name: torch.round(params[t.name].detach() * 100) for t in targets}
    return weights, {t.name: t.weight_class for t in targets}


def prune_events(weights: dict[str, torch.Tensor], classes: dict[str, str], reduce=None) -> dict[str, torch.Tensor]:
    """Masks after each scheme's events of SHARDED_EVENTS, keyed `<scheme>/<name>`."""
    out = {}
    for scheme, sparsities in SHARDED_EVENTS.items():
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        for sparsity in sparsities:
            update_masks_(weights, masks, classes, MagnitudeCriterion(), sparsity, scheme, reduce)
        out.update({f"{scheme}/{n}": m for n, m in masks.items()})
    return out


def check_agreement(rank: int, folder: str) -> None:
    """Identical masks pass; a moved pruned entry, a different count or a missing mask on rank 1 raise."""
    pruner = Pruner(tiny_bert(), PruningConfig(final_sparsity=0.5, schedule="oneshot"))
    pruner.update(0)
    check_ranks_agree(pruner.masks, step=0)
    name = next(iter(pruner.masks))
    errors = {}
    for case in ("moved", "count", "missing"):
        masks = {n: m.clone() for n, m in pruner.masks.items()}
        flat = masks[name].view(-1)
        if rank == 1 and case == "moved":  # same number kept, one pruned position elsewhere
            first_pruned, first_kept = int((~flat).nonzero()[0]), int(flat.nonzero()[0])
            flat[first_pruned], flat[first_kept] = True, False
        elif rank == 1 and case == "count":
            flat[flat.nonzero()[0]] = False
        elif rank == 1:
            del masks[name]
        try:
            check_ranks_agree(masks, step=7)
        except RuntimeError as err:
            errors[case] = str(err)
    Path(folder, f"agreement{rank}.json").write_text(json.dumps(
        {"errors": errors, "fingerprint": masks_fingerprint(pruner.masks).tolist(), "name": name}))


def prune_row_shards(rank: int, folder: str) -> None:
    """Each rank keeps only its block of rows of every weight and prunes it with the others."""
    weights, classes = integer_weights()
    shards = {n: w.chunk(WORLD_SIZE)[rank].clone() for n, w in weights.items()}
    del weights
    save_file(prune_events(shards, classes, ProcessGroupReduce()), os.path.join(folder, f"shards{rank}.safetensors"))


FSDP2_CONFIG = PruningConfig(initial_sparsity=0.2, final_sparsity=0.7, schedule="cubic", start_step=0, end_step=4,
                             pruning_frequency=2)
FSDP2_STEPS = 6
OBD_CONFIG = PruningConfig(final_sparsity=0.6, schedule="cubic", start_step=0, end_step=4, pruning_frequency=2,
                           criterion="obd", fisher_steps=2)


def sharded_tiny_bert(mesh) -> torch.nn.Module:
    """The tiny BERT under FSDP2 `fully_shard` per layer and at the root (intermediate size 37: uneven shards)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_bert()
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def rows(start: int, count: int) -> dict[str, torch.Tensor]:
    """Rows `start ... start + count - 1` of the tiny classification dataset as one batch."""
    dataset = TinyClassificationDataset(start + count)
    return {key: torch.stack([dataset[i][key] for i in range(start, start + count)]) for key in dataset[0]}


def drive_callback(callback: MagnitudePruningCallback, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   args: SimpleNamespace, state, engine=None) -> dict[str, torch.Tensor]:
    """Calls `callback`'s events in the order `Trainer.train()` does, for `state.max_steps` AdamW steps on `batch`;
    returns the full-size masks of the first event (at train begin). With a DeepSpeed `engine`, in accelerate's
    order: the engine steps inside `accelerator.backward`, before the Trainer's optimizer-step events."""
    control = TrainerControl()
    optimizer = engine.optimizer if engine else torch.optim.AdamW(model.parameters(), lr=5e-3)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    first_event = callback.pruner.full_masks()
    for _ in range(state.max_steps):
        if engine is not None:
            engine.backward(engine(**batch).loss)
            engine.step()
        else:
            model(**batch).loss.backward()
        callback.on_pre_optimizer_step(args, state, control)
        if engine is None:
            optimizer.step()
        callback.on_optimizer_step(args, state, control)
        if engine is None:
            optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, control, optimizer=optimizer)
    return first_event


def log_and_save(callback: MagnitudePruningCallback, model: torch.nn.Module, args: SimpleNamespace, state,
                 pruned_folder: str) -> dict[str, float]:
    """What the Trainer does after training with the callback: a log (returned), a checkpoint, and the script's
    `PrunedModel.from_trainer(trainer).save_pretrained(pruned_folder)` on every rank."""
    logs: dict[str, float] = {}
    callback.on_log(args, state, TrainerControl(), logs=logs)
    callback.on_save(args, state, TrainerControl())
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[callback]), model=model,
                              is_world_process_zero=lambda: state.is_world_process_zero)
    PrunedModel.from_trainer(trainer).save_pretrained(pruned_folder, is_main_process=state.is_world_process_zero)
    return logs


def resume(model: torch.nn.Module, args: SimpleNamespace, rank: int,
           config: PruningConfig = FSDP2_CONFIG) -> MagnitudePruningCallback:
    """A fresh callback resumed on `model` at the end of the run whose checkpoint is under `args.output_dir`."""
    callback = MagnitudePruningCallback(config)
    state = TrainerState(max_steps=FSDP2_STEPS, global_step=FSDP2_STEPS, is_world_process_zero=rank == 0)
    callback.on_train_begin(args, state, TrainerControl(), model=model, optimizer=None)
    return callback


def error_of(call: Callable[[], object], error: type[Exception] = ValueError) -> str:
    """The message of the `error` that `call()` raises, "" when it raises none."""
    try:
        call()
    except error as raised:
        return str(raised)
    return ""


def fsdp2_training(rank: int, folder: str) -> None:
    """Drives `MagnitudePruningCallback` through the Trainer's events on an FSDP2 model, one batch per rank (the
    Trainer cannot shard on CPU: accelerate enables FSDP on accelerators only), then saves a checkpoint, gathers a
    `PrunedModel`, resumes from the checkpoint into a fresh sharded model, checks a threshold disagreement and the
    methods that refuse shards, and trains with `criterion="obd"` on the same batch on both ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = sharded_tiny_bert(mesh)
    args = SimpleNamespace(output_dir=os.path.join(folder, "fsdp2_trainer"), resume_from_checkpoint=None)
    state, control = TrainerState(max_steps=FSDP2_STEPS, is_world_process_zero=rank == 0), TrainerControl()
    callback = MagnitudePruningCallback(FSDP2_CONFIG)
    first_event = drive_callback(callback, model, rows(4 * rank, 4), args, state)
    logs = log_and_save(callback, model, args, state, os.path.join(folder, "fsdp2_pruned"))

    resumed_model = sharded_tiny_bert(mesh)
    resumed = resume(resumed_model, args, rank)
    refused = {type(unsupported).__name__: error_of(lambda u=unsupported: u.on_train_begin(
        args, TrainerState(max_steps=FSDP2_STEPS), control, model=resumed_model))
        for unsupported in (RPPCallback(RPPConfig(final_sparsity=0.5)), RegularizationCallback("l1"))}
    disagreement = error_of(lambda: check_thresholds_agree({"threshold": 0.5 + rank}, step=3), RuntimeError)
    params, resumed_params = dict(model.named_parameters()), dict(resumed_model.named_parameters())
    obd = MagnitudePruningCallback(OBD_CONFIG)
    drive_callback(obd, sharded_tiny_bert(mesh), rows(0, 4), args, TrainerState(max_steps=FSDP2_STEPS))
    tensors = {f"first/{n}": m for n, m in first_event.items()}
    tensors.update({f"local/{n}": m for n, m in callback.masks.items()})
    tensors.update({f"obd/{n}": m for n, m in obd.pruner.full_masks().items()})
    tensors.update({f"weight/{n}": params[n].full_tensor().detach() for n in callback.masks})
    tensors.update({f"resumed_local/{n}": m for n, m in resumed.masks.items()})
    tensors.update({f"resumed_weight/{n}": resumed_params[n].full_tensor().detach() for n in resumed.masks})
    metadata = {"logs": json.dumps(logs), "disagreement": disagreement, "refused": json.dumps(refused)}
    save_file(tensors, os.path.join(folder, f"fsdp2_rank{rank}.safetensors"), metadata=metadata)


def fsdp1_tiny_bert() -> torch.nn.Module:
    """The tiny BERT under FSDP1 (`FullyShardedDataParallel`, one unit per layer and one at the root,
    `use_orig_params=True`, on CPU): each weight becomes a 1-D run of its flattened entries, empty on some ranks."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    return FullyShardedDataParallel(tiny_bert(), auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
                                    use_orig_params=True, device_id=torch.device("cpu"))


def fsdp1_training(rank: int, folder: str) -> None:
    """`MagnitudePruningCallback` on an FSDP1 model, through the Trainer's events, one batch per rank; then a
    checkpoint, `PrunedModel.from_trainer`, a resume into a fresh FSDP1 model, and `criterion="obd"` trained on the
    same batch on both ranks."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = fsdp1_tiny_bert()
    args = SimpleNamespace(output_dir=os.path.join(folder, "fsdp1_trainer"), resume_from_checkpoint=None)
    state = TrainerState(max_steps=FSDP2_STEPS, is_world_process_zero=rank == 0)
    callback = MagnitudePruningCallback(FSDP2_CONFIG)
    first_event = drive_callback(callback, model, rows(4 * rank, 4), args, state)
    logs = log_and_save(callback, model, args, state, os.path.join(folder, "fsdp1_pruned"))
    resumed_model = fsdp1_tiny_bert()
    resumed = resume(resumed_model, args, rank)
    obd = MagnitudePruningCallback(OBD_CONFIG)
    drive_callback(obd, fsdp1_tiny_bert(), rows(0, 4), args, TrainerState(max_steps=FSDP2_STEPS))
    flat_only = FullyShardedDataParallel(tiny_bert(), use_orig_params=False, device_id=torch.device("cpu"))
    refusal = error_of(lambda: Pruner(flat_only, FSDP2_CONFIG))

    tensors = {f"first/{n}": m for n, m in first_event.items()}
    tensors.update({f"local/{n}": m for n, m in callback.masks.items()})
    tensors.update({f"resumed_local/{n}": m for n, m in resumed.masks.items()})
    tensors.update({f"obd/{n}": m for n, m in obd.pruner.full_masks().items()})
    for kind, wrapped in (("weight", model), ("resumed_weight", resumed_model)):
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            params = dict(wrapped.named_parameters())
            tensors.update({f"{kind}/{n}": params[n].detach().clone() for n in callback.masks})
    save_file(tensors, os.path.join(folder, f"fsdp1_rank{rank}.safetensors"),
              metadata={"logs": json.dumps(logs), "refusal": refusal})


def worker(rank: int, init_file: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        assert is_distributed()
        check_agreement(rank, folder)
        prune_row_shards(rank, folder)
        fsdp2_training(rank, folder)
        fsdp1_training(rank, folder)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    """`worker` run once on 2 processes in a gloo group (torch.multiprocessing.spawn)."""
    folder = tmp_path_factory.mktemp("spawned")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned processes
        mp.spawn(worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE)
    return folder


def test_check_ranks_agree_raises_naming_the_step_and_tensor(spawned):
    results = [json.loads((spawned / f"agreement{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert results[0]["fingerprint"] == results[1]["fingerprint"]  # same model, same masks: the check passed
    name = results[0]["name"]
    for result in results:  # every rank raises, none goes on training
        errors = result["errors"]
        assert errors.keys() == {"moved", "count", "missing"}
        assert "step 7 in 1 of" in errors["moved"] and f"{name} (kept " in errors["moved"]
        assert f"{name} (kept " in errors["count"]
        assert "step 7" in errors["missing"] and "masks" in errors["missing"]


def test_check_ranks_agree_is_a_no_op_in_one_process():
    assert not is_distributed()
    check_ranks_agree({"w": torch.ones(3, dtype=torch.bool)}, step=0)


def test_row_sharded_select_equals_the_single_process_masks_with_ties(spawned):
    weights, classes = integer_weights()
    total = sum(w.numel() for w in weights.values())
    assert len(torch.cat([w.abs().flatten() for w in weights.values()]).unique()) < 20  # ties everywhere
    expected = prune_events(weights, classes)
    shards = [load_file(str(spawned / f"shards{r}.safetensors")) for r in range(WORLD_SIZE)]
    for key, mask in expected.items():
        assert torch.equal(torch.cat([shard[key] for shard in shards]), mask), key
    blind = [m for k, m in expected.items() if k.startswith("class-blind/")]
    assert sum(int((~m).sum()) for m in blind) == round(0.6 * total)


def read_sharded_rank(folder: Path, rank: int,
                      prefix: str = "fsdp2") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """<prefix>_rank<r>.safetensors as {kind: {parameter name: tensor}} and its metadata."""
    path = str(folder / f"{prefix}_rank{rank}.safetensors")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        kind, _, name = key.partition("/")
        grouped.setdefault(kind, {})[name] = tensor
    with safe_open(path, "pt") as f:
        return grouped, f.metadata()


SPAWNED = {"fsdp1": "spawned", "fsdp2": "spawned", "zero3": "zero3_spawned"}  # the fixture that ran each sharding's worker


@pytest.mark.parametrize("sharding", sorted(SPAWNED))
def test_first_event_on_shards_equals_the_single_process_masks(request, sharding):
    folder = request.getfixturevalue(SPAWNED[sharding])
    reference = Pruner(tiny_bert(), FSDP2_CONFIG, max_steps=FSDP2_STEPS)
    reference.update(0)
    for rank in range(WORLD_SIZE):
        first = read_sharded_rank(folder, rank, sharding)[0]["first"]
        assert first.keys() == reference.masks.keys()
        for name, mask in reference.masks.items():
            assert torch.equal(first[name], mask), name


@pytest.mark.parametrize("sharding", sorted(SPAWNED))
def test_mask_file_of_a_sharded_run_loads_in_one_process(request, sharding):
    """A mask file written by a 2-rank sharded run loads under another world size (here: 1, unsharded)."""
    folder = request.getfixturevalue(SPAWNED[sharding])
    saved = load_masks(folder / f"{sharding}_trainer" / f"checkpoint-{FSDP2_STEPS}" / MASKS_NAME)
    pruner = Pruner(tiny_bert(), FSDP2_CONFIG)
    pruner.load_masks(saved)
    assert pruner.sparsity() == pytest.approx(0.7, abs=1e-3)


def test_fsdp2_training_keeps_shard_masks_exact_and_saves_them_gathered(spawned):
    ranks = [read_sharded_rank(spawned, r) for r in range(WORLD_SIZE)]
    saved = load_masks(spawned / "fsdp2_trainer" / f"checkpoint-{FSDP2_STEPS}" / MASKS_NAME)
    uneven = "bert.encoder.layer.0.intermediate.dense.weight"
    assert [r[0]["local"][uneven].shape[0] for r in ranks] == [19, 18]  # torch.chunk of 37 rows
    total = sum(m.numel() for m in saved.values())
    assert sum(int((~m).sum()) for m in saved.values()) == round(0.7 * total)  # the exact global target
    for name, mask in saved.items():
        assert torch.equal(torch.cat([r[0]["local"][name] for r in ranks]), mask), name
        weight = ranks[0][0]["weight"][name]
        assert (weight[~mask] == 0).all() and (weight[mask] != 0).all(), name
    for _, metadata in ranks:  # every rank logs the global sparsity, not its shard's
        assert json.loads(metadata["logs"])["sparsity"] == pytest.approx(1 - sum(int(m.sum()) for m in saved.values())
                                                                         / total)


def test_fsdp2_resume_loads_the_gathered_masks_into_fresh_shards(spawned):
    saved = load_masks(spawned / "fsdp2_trainer" / f"checkpoint-{FSDP2_STEPS}" / MASKS_NAME)
    ranks = [read_sharded_rank(spawned, r)[0] for r in range(WORLD_SIZE)]
    fresh = dict(tiny_bert().named_parameters())
    for name, mask in saved.items():
        assert torch.equal(torch.cat([r["resumed_local"][name] for r in ranks]), mask), name
        weight = ranks[0]["resumed_weight"][name]
        assert torch.equal(weight, fresh[name].detach() * mask), name  # the fresh weights, masked


def test_fsdp2_pruned_model_is_gathered_and_written_by_the_main_process(spawned):
    folder = spawned / "fsdp2_pruned"
    assert sorted(os.listdir(folder)) == sorted(SAVED_FILES)
    pruned = PrunedModel.from_pretrained(folder)
    trained = read_sharded_rank(spawned, 0)[0]["weight"]
    params = dict(pruned.model.named_parameters())
    assert pruned.masks.keys() == trained.keys()
    for name, weight in trained.items():
        assert torch.equal(params[name].detach(), weight), name
        assert torch.equal(pruned.masks[name], weight != 0), name


def test_sharded_ranks_that_disagree_on_the_threshold_raise(spawned):
    for rank in range(WORLD_SIZE):
        message = read_sharded_rank(spawned, rank)[1]["disagreement"]
        assert "thresholds differ across ranks at step 3" in message


def test_weights_partly_sharded_are_refused_before_training():
    model = tiny_bert()
    model.bert.encoder.layer[1].output.dense.weight.ds_tensor = torch.zeros(0)  # what ZeRO-3 attaches
    with pytest.raises(ValueError, match="laid out alike: bert.encoder.layer.1.output.dense.weight is a ZeRO-3 shard "
                                         "but bert.encoder.layer.0.attention.self.query.weight is not"):
        Pruner(model, PruningConfig(schedule="oneshot"))


def test_methods_without_sharding_support_refuse_fsdp2_weights(spawned):
    refused = json.loads(read_sharded_rank(spawned, 0)[1]["refused"])
    assert refused.keys() == {"RPPCallback", "RegularizationCallback"}
    assert all("does not support sharded weights" in message for message in refused.values())


@pytest.mark.parametrize("sharding", ["fsdp1", "fsdp2"])
def test_obd_on_shards_equals_the_unsharded_run(spawned, sharding):
    """Both ranks train on the same batch, so FSDP's averaged gradients are the single process's, and OBD's
    Fisher statistics gathered per shard rank the weights exactly as unsharded."""
    reference = MagnitudePruningCallback(OBD_CONFIG)
    args = SimpleNamespace(output_dir=str(spawned / "unused"), resume_from_checkpoint=None)
    drive_callback(reference, tiny_bert(), rows(0, 4), args, TrainerState(max_steps=FSDP2_STEPS))
    magnitude = MagnitudePruningCallback(dataclasses.replace(OBD_CONFIG, criterion="magnitude"))
    drive_callback(magnitude, tiny_bert(), rows(0, 4), args, TrainerState(max_steps=FSDP2_STEPS))
    assert any(not torch.equal(m, magnitude.masks[n]) for n, m in reference.masks.items())  # OBD ranks differently
    for rank in range(WORLD_SIZE):
        obd = read_sharded_rank(spawned, rank, sharding)[0]["obd"]
        assert obd.keys() == reference.masks.keys()
        for name, mask in reference.masks.items():
            assert torch.equal(obd[name], mask), name


ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "torch_adam": True}},
                # 32x32 attention weights (1024 entries) stay gathered between steps, 37x32 feed-forward ones do not
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1100}}
PERSISTENT = "bert.encoder.layer.0.attention.self.query.weight"
PARTITIONED = "bert.encoder.layer.0.intermediate.dense.weight"


def zero3_engine(model: torch.nn.Module):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ZERO3_CONFIG, model_parameters=model.parameters())
    return engine


def gathered(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """The full weights `names` of a ZeRO-3 model (what a forward uses) and the full fp32 master copies."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params, out = dict(model.named_parameters()), {}
    for name in names:
        with deepspeed.zero.GatheredParameters([params[name]]):
            out[f"weight/{name}"] = params[name].detach().cpu().clone()
        out[f"master/{name}"] = safe_get_full_fp32_param(params[name]).detach().cpu().clone()
    return out


def zero3_training(rank: int, folder: str) -> None:
    """`MagnitudePruningCallback` on a DeepSpeed ZeRO-3 engine, driven in accelerate's event order (the engine steps
    inside `accelerator.backward`, before the Trainer's optimizer-step events), one batch per rank; then a
    checkpoint, `PrunedModel.from_trainer`, a resume into a fresh engine, and the refusal of OBD."""
    model = tiny_bert()
    engine = zero3_engine(model)
    args = SimpleNamespace(output_dir=os.path.join(folder, "zero3_trainer"), resume_from_checkpoint=None)
    state = TrainerState(max_steps=FSDP2_STEPS, is_world_process_zero=rank == 0)
    callback = MagnitudePruningCallback(FSDP2_CONFIG)
    first_event = drive_callback(callback, model, rows(4 * rank, 4), args, state, engine)
    # what the next forward uses of the weights ZeRO-3 keeps gathered between steps (the others come from the
    # partitions, checked below)
    persistent = {n: p.data.clone() for n, p in model.named_parameters() if n in callback.masks and p.ds_persist}
    logs = log_and_save(callback, model, args, state, os.path.join(folder, "zero3_pruned"))

    resumed_model = tiny_bert()
    zero3_engine(resumed_model)
    resumed = resume(resumed_model, args, rank)
    obd_refusal = error_of(lambda: Pruner(resumed_model, OBD_CONFIG))

    tensors = {f"first/{n}": m for n, m in first_event.items()}
    tensors.update({f"local/{n}": m for n, m in callback.masks.items()})
    tensors.update({f"trained_{k}": v for k, v in gathered(model, callback.masks).items()})
    tensors.update({f"persistent/{n}": w for n, w in persistent.items()})
    tensors.update({f"resumed_local/{n}": m for n, m in resumed.masks.items()})
    tensors.update({f"resumed_{k}": v for k, v in gathered(resumed_model, resumed.masks).items()})
    metadata = {"logs": json.dumps(logs), "obd_refusal": obd_refusal,
                "persist": json.dumps({n: bool(p.ds_persist) for n, p in model.named_parameters()})}
    save_file(tensors, os.path.join(folder, f"zero3_rank{rank}.safetensors"), metadata=metadata)


def zero3_worker(rank: int, init_file: str, folder: str) -> None:
    import deepspeed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))  # what launchers set
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        deepspeed.init_distributed(dist_backend="gloo")
        zero3_training(rank, folder)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_spawned(tmp_path_factory) -> Path:
    """`zero3_worker` on 2 processes in a gloo group, DeepSpeed on its CPU accelerator."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    folder = tmp_path_factory.mktemp("zero3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("DS_ACCELERATOR", "cpu")
        mp.spawn(zero3_worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE)
    return folder


def test_fsdp1_training_prunes_flat_runs_and_saves_gathered_masks(spawned):
    ranks = [read_sharded_rank(spawned, r, "fsdp1") for r in range(WORLD_SIZE)]
    saved = load_masks(spawned / "fsdp1_trainer" / f"checkpoint-{FSDP2_STEPS}" / MASKS_NAME)
    sizes = {name: [r[0]["local"][name].numel() for r in ranks] for name in saved}
    assert any(0 in per_rank for per_rank in sizes.values())  # some weights lie wholly on one rank
    total = sum(m.numel() for m in saved.values())
    assert sum(int((~m).sum()) for m in saved.values()) == round(0.7 * total)
    fresh = dict(tiny_bert().named_parameters())
    for name, mask in saved.items():
        assert torch.equal(torch.cat([r[0]["local"][name] for r in ranks]), mask.view(-1)), name
        weight = ranks[0][0]["weight"][name]
        assert (weight[~mask] == 0).all() and (weight[mask] != 0).all(), name
        assert torch.equal(torch.cat([r[0]["resumed_local"][name] for r in ranks]), mask.view(-1)), name
        assert torch.equal(ranks[0][0]["resumed_weight"][name], fresh[name].detach() * mask), name
    pruned = PrunedModel.from_pretrained(spawned / "fsdp1_pruned")
    params = dict(pruned.model.named_parameters())
    for name, mask in saved.items():
        assert torch.equal(pruned.masks[name], mask) and torch.equal(params[name], ranks[0][0]["weight"][name]), name
    for _, metadata in ranks:
        assert json.loads(metadata["logs"])["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_fsdp1_without_original_parameters_is_refused(spawned):
    message = read_sharded_rank(spawned, 0, "fsdp1")[1]["refusal"]
    assert message.startswith("bert.encoder.layer.0.attention.self.query.weight and 11 more targeted weights are not "
                              "parameters of BertForSequenceClassification: FSDP1 with use_orig_params=False")


def test_zero3_training_zeroes_weights_and_fp32_masters_and_saves_gathered_masks(zero3_spawned):
    ranks = [read_sharded_rank(zero3_spawned, r, "zero3") for r in range(WORLD_SIZE)]
    persist = json.loads(ranks[0][1]["persist"])
    assert persist[PERSISTENT] and not persist[PARTITIONED]  # both kinds of ZeRO-3 parameter are covered
    saved = load_masks(zero3_spawned / "zero3_trainer" / f"checkpoint-{FSDP2_STEPS}" / MASKS_NAME)
    assert [r[0]["local"][PARTITIONED].shape for r in ranks] == [(592,), (592,)]  # 1-D halves of 37x32
    total = sum(m.numel() for m in saved.values())
    assert sum(int((~m).sum()) for m in saved.values()) == round(0.7 * total)
    for name, mask in saved.items():
        assert torch.equal(torch.cat([r[0]["local"][name] for r in ranks]).view(mask.shape), mask), name
        for kind in ("trained_weight", "trained_master"):
            weight = ranks[0][0][kind][name]
            assert (weight[~mask] == 0).all() and (weight[mask] != 0).all(), (kind, name)
    assert PERSISTENT in ranks[0][0]["persistent"] and PARTITIONED not in ranks[0][0]["persistent"]
    for rank, _ in ranks:
        for name, weight in rank["persistent"].items():
            assert torch.equal(weight, rank["trained_weight"][name]), name
    for _, metadata in ranks:
        assert json.loads(metadata["logs"])["sparsity"] == pytest.approx(1 - sum(int(m.sum()) for m in saved.values())
                                                                         / total)


def test_zero3_pruned_model_is_gathered_once_and_resume_scatters_the_masks(zero3_spawned):
    ranks = [read_sharded_rank(zero3_spawned, r, "zero3")[0] for r in range(WORLD_SIZE)]
    folder = zero3_spawned / "zero3_pruned"
    assert sorted(os.listdir(folder)) == sorted(SAVED_FILES)
    pruned = PrunedModel.from_pretrained(folder)
    params = dict(pruned.model.named_parameters())
    saved = load_masks(zero3_spawned / "zero3_trainer" / f"checkpoint-{FSDP2_STEPS}" / MASKS_NAME)
    fresh = dict(tiny_bert().named_parameters())
    for name, mask in saved.items():
        assert torch.equal(pruned.masks[name], mask) and torch.equal(params[name], ranks[0]["trained_weight"][name])
        assert torch.equal(torch.cat([r["resumed_local"][name] for r in ranks]).view(mask.shape), mask), name
        for kind in ("resumed_weight", "resumed_master"):
            assert torch.equal(ranks[0][kind][name], fresh[name].detach() * mask), (kind, name)


def test_zero3_refuses_gradient_criteria(zero3_spawned):
    message = read_sharded_rank(zero3_spawned, 0, "zero3")[1]["obd_refusal"]
    assert "`criterion` 'obd' needs each weight's gradient" in message and "ZeRO-3" in message
