"""Multi-process pruning on CPU with gloo. Each worker program `distributed_worker_<purpose>.py` beside this file
runs under `torchrun --standalone --nproc_per_node 2` and writes what its ranks saw into a folder that the tests read:
`trainer` (the real Trainer under DDP, and the rank-agreement error of a rank that prunes differently),
`collectives` (the rank-agreement check and the radix select over row-sharded weights), `fsdp` (the callback's
events on FSDP2 `fully_shard` and FSDP1 shards), `zero3` (the same on a DeepSpeed ZeRO-3 engine)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_MODELS, tiny_bert
from distributed_worker_common import (
    OBD_CONFIG,
    PARTITIONED,
    PERSISTENT,
    RUN_CONFIG,
    RUN_STEPS,
    WORLD_SIZE,
    drive_callback,
    integer_weights,
    prune_events,
    rows,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerState

from hf_prune import MagnitudePruningCallback, PrunedModel, Pruner, PruningConfig
from hf_prune.constants import MASKS_NAME
from hf_prune.distributed import check_ranks_agree, check_thresholds_agree, is_distributed
from hf_prune.serialization import load_masks


pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SAVED_FILES = ["README.md", "config.json", "model.safetensors", "pruning_config.json", MASKS_NAME]
ABORT_AT_EXIT = "terminate called"  # what the C++ runtime prints when it aborts the process (e.g. at its exit)


def worker_env(**extra: str) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": pythonpath, **extra}


def torchrun(purpose: str, folder: Path, *worker_args: str, nproc: int = WORLD_SIZE,
             **env: str) -> subprocess.CompletedProcess:
    """tests/distributed_worker_<purpose>.py under `torchrun --standalone --nproc_per_node 2` (CPU, gloo, unless
    sharded on GPUs), writing into `folder`."""
    worker = TESTS / f"distributed_worker_{purpose}.py"
    assert worker.is_file(), worker
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(worker), "--output_dir", str(folder), *worker_args]
    return subprocess.run(command, env=worker_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=300)


def run_worker(purpose: str, folder: Path, *worker_args: str, nproc: int = WORLD_SIZE, **env: str) -> Path:
    """`torchrun(...)` that must succeed on every rank and shut down cleanly; returns `folder`."""
    result = torchrun(purpose, folder, *worker_args, nproc=nproc, **env)
    output = f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, f"the {purpose} worker failed:\n{output}"
    assert ABORT_AT_EXIT not in result.stdout + result.stderr, f"the {purpose} worker aborted at exit:\n{output}"
    return folder


def read_rank(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Masks, targeted weights and metadata that distributed_worker_trainer.py wrote for `rank`."""
    path = folder / f"rank{rank}.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    masks = {k.removeprefix("mask/"): v for k, v in tensors.items() if k.startswith("mask/")}
    weights = {k.removeprefix("weight/"): v for k, v in tensors.items() if k.startswith("weight/")}
    return masks, weights, metadata


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    return run_worker("trainer", tmp_path_factory.mktemp("ddp"))


@pytest.mark.slow
def test_ddp_ranks_train_on_identical_sparse_masks(ddp_run):
    (masks0, weights0, meta0), (masks1, weights1, meta1) = (read_rank(ddp_run, r) for r in range(WORLD_SIZE))
    assert meta0["world_size"] == meta1["world_size"] == str(WORLD_SIZE)
    assert meta0["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert meta0["masks_id"] == meta1["masks_id"] != "", "one id per run: each node's checkpoint may name it"
    assert masks0.keys() == masks1.keys() and masks0
    for name, mask in masks0.items():
        assert torch.equal(mask, masks1[name]), name
        assert torch.equal(weights0[name], weights1[name]), name
        assert (weights0[name][~mask] == 0).all(), name
    total = sum(m.numel() for m in masks0.values())
    assert sum(int((~m).sum()) for m in masks0.values()) == round(0.7 * total)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Trainer shards (FSDP, DeepSpeed) only on accelerators")
@pytest.mark.parametrize("sharding", ["fsdp1", "fsdp2", "zero3"])
def test_trainer_with_sharded_weights_prunes_shards_and_saves_full_masks(tmp_path, sharding):
    """The real Trainer under FSDP1, FSDP2 or DeepSpeed ZeRO-3, on up to 2 GPUs (one process per GPU)."""
    if sharding == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    world_size = min(WORLD_SIZE, torch.cuda.device_count())
    run_worker("trainer", tmp_path, "--sharding", sharding, nproc=world_size)
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


@pytest.mark.slow
def test_ddp_training_stops_when_one_rank_prunes_differently(tmp_path):
    result = torchrun("trainer", tmp_path, "--skew_rank", "1")
    assert result.returncode != 0
    assert "RuntimeError: Pruning masks differ across ranks at step 2 in 1 of" in result.stdout + result.stderr
    assert not list(tmp_path.glob("rank*.safetensors"))  # no rank got past training


@pytest.fixture(scope="module")
def collectives_run(tmp_path_factory) -> Path:
    return run_worker("collectives", tmp_path_factory.mktemp("collectives"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    return run_worker("fsdp", tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    return run_worker("zero3", tmp_path_factory.mktemp("zero3"), DS_ACCELERATOR="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["obd", "wanda"])
def test_data_criteria_under_ddp_rank_by_the_batches_of_every_rank(collectives_run, criterion):
    # each rank estimated from its own two batches: the statistics are summed over the ranks before the event
    from distributed_worker_collectives import data_criterion_batches

    model = tiny_bert()
    reference = Pruner(model, PruningConfig(final_sparsity=0.5, schedule="oneshot", criterion=criterion))
    reference.estimate_fisher(model, data_criterion_batches())
    reference.prune_to(0.5)
    for rank in range(WORLD_SIZE):
        masks = load_file(str(collectives_run / f"{criterion}{rank}.safetensors"))
        assert masks.keys() == reference.masks.keys()
        assert all(torch.equal(masks[name], mask) for name, mask in reference.masks.items()), rank


def test_check_ranks_agree_raises_naming_the_step_and_tensor(collectives_run):
    results = [json.loads((collectives_run / f"agreement{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert results[0]["fingerprint"] == results[1]["fingerprint"]  # same model, same masks: the check passed
    name = results[0]["name"]
    for result in results:  # every rank raises, none goes on training
        errors = result["errors"]
        assert errors.keys() == {"moved", "count", "missing"}
        assert "step 7 in 1 of" in errors["moved"] and f"{name} (kept " in errors["moved"]
        assert f"{name} (kept " in errors["count"]
        assert "step 7" in errors["missing"] and "masks" in errors["missing"]


def test_rank_checks_are_no_ops_in_one_process(tmp_path, monkeypatch):
    """In one process, with torch.distributed uninitialised or in a group of one (`torchrun --nproc_per_node 1`),
    the rank checks run no collective and change nothing, whatever the masks or thresholds; the collectives they
    would run in a larger group are the ones watched here."""
    collectives: list[str] = []

    def watched(name):
        def collective(*args, **kwargs):
            collectives.append(name)
            raise AssertionError(f"torch.distributed.{name} ran in a one-process run")
        return collective

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier"):
        monkeypatch.setattr(dist, name, watched(name))
    masks = {"w": torch.tensor([True, False, True]), "v": torch.zeros(2, 2, dtype=torch.bool)}
    expected = {name: mask.clone() for name, mask in masks.items()}

    def check_both() -> None:
        assert not is_distributed()
        assert check_ranks_agree(masks, step=0) is None
        assert check_thresholds_agree({"threshold": 0.5, "class/attention": float("nan")}, step=0) is None
        assert masks.keys() == expected.keys() and all(torch.equal(masks[n], m) for n, m in expected.items())

    assert not dist.is_initialized()
    check_both()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1
        check_both()
        assert collectives == []
        with monkeypatch.context() as patch:  # were the group larger, the same calls would reach the collectives
            patch.setattr("hf_prune.distributed.agreement.is_distributed", lambda group=None: True)
            with pytest.raises(AssertionError, match="torch.distributed.all_reduce ran"):
                check_ranks_agree(masks, step=0)
            with pytest.raises(AssertionError, match="torch.distributed.all_reduce ran"):
                check_thresholds_agree({"threshold": 0.5}, step=0)
    finally:
        dist.destroy_process_group()
    assert collectives == ["all_reduce", "all_reduce"]


def test_the_gathered_copy_keeps_the_generation_config_and_a_peft_model_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_prune.distributed import gather_unsharded

    model = TINY_MODELS["llama"]()
    model.generation_config.num_beams, model.generation_config.max_length = 4, 77
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:  # a group of one: the same full-state-dict path as under FSDP, on one process
        gathered = gather_unsharded(model, is_main_process=True)
        assert (gathered.generation_config.num_beams, gathered.generation_config.max_length) == (4, 77)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), gathered.state_dict().values()))
        peft_model = get_peft_model(TINY_MODELS["llama"](), LoraConfig(target_modules=["q_proj"], r=2))
        with pytest.raises(ValueError, match="sharded PeftModel cannot be gathered"):
            gather_unsharded(peft_model, is_main_process=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_row_sharded_select_equals_the_single_process_masks_with_ties(collectives_run):
    weights, classes = integer_weights()
    total = sum(w.numel() for w in weights.values())
    assert len(torch.cat([w.abs().flatten() for w in weights.values()]).unique()) < 20  # ties everywhere
    expected = prune_events(weights, classes)
    shards = [load_file(str(collectives_run / f"shards{r}.safetensors")) for r in range(WORLD_SIZE)]
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


SHARDED_RUNS = {"fsdp1": "fsdp_run", "fsdp2": "fsdp_run", "zero3": "zero3_run"}  # the fixture of each sharding


@pytest.mark.slow
@pytest.mark.parametrize("sharding", sorted(SHARDED_RUNS))
def test_first_event_on_shards_equals_the_single_process_masks(request, sharding):
    folder = request.getfixturevalue(SHARDED_RUNS[sharding])
    reference = Pruner(tiny_bert(), RUN_CONFIG, max_steps=RUN_STEPS)
    reference.update(0)
    for rank in range(WORLD_SIZE):
        first = read_sharded_rank(folder, rank, sharding)[0]["first"]
        assert first.keys() == reference.masks.keys()
        for name, mask in reference.masks.items():
            assert torch.equal(first[name], mask), name


@pytest.mark.slow
@pytest.mark.parametrize("sharding", sorted(SHARDED_RUNS))
def test_mask_file_of_a_sharded_run_loads_in_one_process(request, sharding):
    """A mask file written by a 2-rank sharded run loads under another world size (here: 1, unsharded)."""
    folder = request.getfixturevalue(SHARDED_RUNS[sharding])
    saved = load_masks(folder / f"{sharding}_trainer" / f"checkpoint-{RUN_STEPS}" / MASKS_NAME)
    pruner = Pruner(tiny_bert(), RUN_CONFIG)
    pruner.load_masks(saved)
    assert pruner.sparsity() == pytest.approx(0.7, abs=1e-3)


@pytest.mark.slow
def test_fsdp2_training_keeps_shard_masks_exact_and_saves_them_gathered(fsdp_run):
    ranks = [read_sharded_rank(fsdp_run, r) for r in range(WORLD_SIZE)]
    saved = load_masks(fsdp_run / "fsdp2_trainer" / f"checkpoint-{RUN_STEPS}" / MASKS_NAME)
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


@pytest.mark.slow
def test_fsdp2_resume_loads_the_gathered_masks_into_fresh_shards(fsdp_run):
    saved = load_masks(fsdp_run / "fsdp2_trainer" / f"checkpoint-{RUN_STEPS}" / MASKS_NAME)
    ranks = [read_sharded_rank(fsdp_run, r)[0] for r in range(WORLD_SIZE)]
    fresh = dict(tiny_bert().named_parameters())
    for name, mask in saved.items():
        assert torch.equal(torch.cat([r["resumed_local"][name] for r in ranks]), mask), name
        weight = ranks[0]["resumed_weight"][name]
        assert torch.equal(weight, fresh[name].detach() * mask), name  # the fresh weights, masked


@pytest.mark.slow
def test_fsdp2_pruned_model_is_gathered_and_written_by_the_main_process(fsdp_run):
    folder = fsdp_run / "fsdp2_pruned"
    assert sorted(os.listdir(folder)) == sorted(SAVED_FILES)
    pruned = PrunedModel.from_pretrained(folder)
    trained = read_sharded_rank(fsdp_run, 0)[0]["weight"]
    params = dict(pruned.model.named_parameters())
    assert pruned.masks.keys() == trained.keys()
    for name, weight in trained.items():
        assert torch.equal(params[name].detach(), weight), name
        assert torch.equal(pruned.masks[name], weight != 0), name


@pytest.mark.slow
def test_sharded_ranks_that_disagree_on_the_threshold_raise(fsdp_run):
    for rank in range(WORLD_SIZE):
        message = read_sharded_rank(fsdp_run, rank)[1]["disagreement"]
        assert "thresholds differ across ranks at step 3" in message


def test_weights_partly_sharded_are_refused_before_training():
    model = tiny_bert()
    model.bert.encoder.layer[1].output.dense.weight.ds_tensor = torch.zeros(0)  # what ZeRO-3 attaches
    with pytest.raises(ValueError, match="laid out alike: bert.encoder.layer.1.output.dense.weight is a ZeRO-3 shard "
                                         "but bert.encoder.layer.0.attention.self.query.weight is not"):
        Pruner(model, PruningConfig(schedule="oneshot"))


@pytest.mark.slow
def test_methods_without_sharding_support_refuse_fsdp2_weights(fsdp_run):
    refused = json.loads(read_sharded_rank(fsdp_run, 0)[1]["refused"])
    assert refused.keys() == {"RPPCallback", "RegularizationCallback", "wanda", "estimate_fisher"}
    assert all("does not support sharded weights" in refused[name] for name in ("RPPCallback", "RegularizationCallback"))
    assert "`criterion` 'wanda' weighs each input feature of a weight, which FSDP / ZeRO-3 shard" in refused["wanda"]
    assert "estimate_fisher with `criterion` 'obd' takes the gradients of whole weights" in refused["estimate_fisher"]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp1", "fsdp2"])
def test_obd_on_shards_equals_the_unsharded_run(fsdp_run, sharding):
    """Both ranks train on the same batch, so FSDP's averaged gradients are the single process's, and OBD's
    Fisher statistics gathered per shard rank the weights exactly as unsharded."""
    reference = MagnitudePruningCallback(OBD_CONFIG)
    args = SimpleNamespace(output_dir=str(fsdp_run / "unused"), resume_from_checkpoint=None, should_save=True)
    drive_callback(reference, tiny_bert(), rows(0, 4), args, TrainerState(max_steps=RUN_STEPS))
    magnitude = MagnitudePruningCallback(dataclasses.replace(OBD_CONFIG, criterion="magnitude"))
    drive_callback(magnitude, tiny_bert(), rows(0, 4), args, TrainerState(max_steps=RUN_STEPS))
    assert any(not torch.equal(m, magnitude.masks[n]) for n, m in reference.masks.items())  # OBD ranks differently
    for rank in range(WORLD_SIZE):
        obd = read_sharded_rank(fsdp_run, rank, sharding)[0]["obd"]
        assert obd.keys() == reference.masks.keys()
        for name, mask in reference.masks.items():
            assert torch.equal(obd[name], mask), name


@pytest.mark.slow
def test_fsdp1_training_prunes_flat_runs_and_saves_gathered_masks(fsdp_run):
    ranks = [read_sharded_rank(fsdp_run, r, "fsdp1") for r in range(WORLD_SIZE)]
    saved = load_masks(fsdp_run / "fsdp1_trainer" / f"checkpoint-{RUN_STEPS}" / MASKS_NAME)
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
    pruned = PrunedModel.from_pretrained(fsdp_run / "fsdp1_pruned")
    params = dict(pruned.model.named_parameters())
    for name, mask in saved.items():
        assert torch.equal(pruned.masks[name], mask) and torch.equal(params[name], ranks[0][0]["weight"][name]), name
    for _, metadata in ranks:
        assert json.loads(metadata["logs"])["sparsity"] == pytest.approx(0.7, abs=1e-3)


@pytest.mark.slow
def test_fsdp1_without_original_parameters_is_refused(fsdp_run):
    message = read_sharded_rank(fsdp_run, 0, "fsdp1")[1]["refusal"]
    assert message.startswith("12 targeted weights, such as bert.encoder.layer.0.attention.self.query.weight, are "
                              "not parameters of BertForSequenceClassification: FSDP1 with use_orig_params=False")


@pytest.mark.slow
def test_zero3_training_zeroes_weights_and_fp32_masters_and_saves_gathered_masks(zero3_run):
    ranks = [read_sharded_rank(zero3_run, r, "zero3") for r in range(WORLD_SIZE)]
    persist = json.loads(ranks[0][1]["persist"])
    assert persist[PERSISTENT] and not persist[PARTITIONED]  # both kinds of ZeRO-3 parameter are covered
    saved = load_masks(zero3_run / "zero3_trainer" / f"checkpoint-{RUN_STEPS}" / MASKS_NAME)
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


@pytest.mark.slow
def test_zero3_pruned_model_is_gathered_once_and_resume_scatters_the_masks(zero3_run):
    ranks = [read_sharded_rank(zero3_run, r, "zero3")[0] for r in range(WORLD_SIZE)]
    folder = zero3_run / "zero3_pruned"
    assert sorted(os.listdir(folder)) == sorted(SAVED_FILES)
    pruned = PrunedModel.from_pretrained(folder)
    params = dict(pruned.model.named_parameters())
    saved = load_masks(zero3_run / "zero3_trainer" / f"checkpoint-{RUN_STEPS}" / MASKS_NAME)
    fresh = dict(tiny_bert().named_parameters())
    for name, mask in saved.items():
        assert torch.equal(pruned.masks[name], mask) and torch.equal(params[name], ranks[0]["trained_weight"][name])
        assert torch.equal(torch.cat([r["resumed_local"][name] for r in ranks]).view(mask.shape), mask), name
        for kind in ("resumed_weight", "resumed_master"):
            assert torch.equal(ranks[0][kind][name], fresh[name].detach() * mask), (kind, name)


@pytest.mark.slow
def test_zero3_refuses_gradient_criteria(zero3_run):
    message = read_sharded_rank(zero3_run, 0, "zero3")[1]["obd_refusal"]
    assert "`criterion` 'obd' needs each weight's gradient" in message and "ZeRO-3" in message
