"""`PrunedModel`: a model together with its masks, saved, loaded and shared like any transformers model."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from accelerate.utils import extract_model_from_parallel
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError
from torch import nn

from . import __version__
from .compression import check_bits, dequantize, quantize_weights, read_deep_compressed, save_deep_compressed
from .config import PruningConfig, resolve_file
from .constants import COMPRESSED_FORMAT, COMPRESSED_WEIGHTS_NAME, DEEP_COMPRESSED_WEIGHTS_NAME, MASKS_NAME
from .han import HanConfig, apply_dropout_adjustment
from .masks import zero_pruned_
from .report import SparsityReport, sparsity_report
from .serialization import atomic_save_safetensors, atomic_write_text, load_masks, read_tagged_safetensors, save_masks
from .targets import find_targets


COMPRESSIONS = (None, "sparse", "deep")
#: `from_pretrained` keyword arguments that also apply to downloading hf_prune's own files.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")


class PrunedModel(nn.Module):
    """A transformers model and its pruning masks (parameter name -> `torch.bool`, True = kept).

    It behaves like the wrapped model (`forward`, `generate`, `config` and other attributes are the model's),
    and the pruned weights are exactly zero in it. `save_pretrained` writes the model's own files, with the
    pruned entries as zeros, plus `pruning_masks.safetensors` (1 bit per weight), `pruning_config.json` and a
    model card; `from_pretrained` restores all of it, so a plain `AutoModel*.from_pretrained` of the same folder
    loads the (sparse) model and hf_prune additionally gets the masks back.

    ```python
    pruned = PrunedModel.from_trainer(trainer)      # after training with MagnitudePruningCallback
    pruned.save_pretrained("out")
    pruned = PrunedModel.from_pretrained("out")
    print(pruned.sparsity_report())
    ```

    Args:
        model (`nn.Module`): the model (a `PreTrainedModel`, or a `PeftModel` around one).
        masks (`dict[str, torch.Tensor]`): boolean masks keyed by the model's parameter names.
        pruning_config (`PruningConfig`, *optional*): the configuration that produced the masks.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor],
                 pruning_config: PruningConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.pruning_config = pruning_config or PruningConfig()
        self._param_names = _parameter_names(model, masks)
        params = dict(model.named_parameters())
        self.masks = {name: mask.to(device=params[self._param_names[name]].device, dtype=torch.bool)
                      for name, mask in masks.items()}
        self.apply_masks_()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Sets every pruned weight to exactly zero."""
        params = dict(self.model.named_parameters())
        for name, mask in self.masks.items():
            zero_pruned_(params[self._param_names[name]], mask)

    def sparsity_report(self) -> SparsityReport:
        """Per-layer, per-class and overall sparsity of the masked weights."""
        return sparsity_report(self.model, self.masks, self.pruning_config)

    @classmethod
    def from_trainer(cls, trainer: transformers.Trainer) -> PrunedModel:
        """The model a `Trainer` trained with a `MagnitudePruningCallback` (or subclass), with its masks.

        With sharded weights (FSDP, DeepSpeed ZeRO-3) every rank must call it: the weights and masks are gathered
        to full size on the CPU of the main process, as `Trainer.save_model` gathers a full state dict, into an
        unsharded copy of the model. The other ranks get the model on the meta device: pass `is_main_process` to
        `save_pretrained`.
        """
        from .callbacks import MagnitudePruningCallback

        callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MagnitudePruningCallback)]
        if len(callbacks) != 1 or not callbacks[0].masks:
            raise ValueError(f"from_trainer needs exactly one pruning callback that has run; found {len(callbacks)}"
                             f"{' (not trained yet)' if callbacks and not callbacks[0].masks else ''}.")
        pruner = callbacks[0].pruner
        if pruner.group is None:
            return cls(trainer.model, pruner.masks, callbacks[0].config)
        masks = pruner.full_masks()
        return cls(_gather_unsharded(trainer.model, trainer.is_world_process_zero()), masks, callbacks[0].config)

    def merge_and_unload(self) -> PrunedModel:
        """Merges the adapters of a wrapped `PeftModel` (LoRA, ...) into the base weights and re-applies the masks.

        Merging a dense LoRA update would otherwise fill every pruned position; here the update is kept only
        where the weight is kept, so the merged model has exactly the pruned model's sparsity.
        """
        return PrunedModel(self.model.merge_and_unload(), self.masks, self.pruning_config)

    # ----------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, compressed: bool = False,
                        compression: str | None = None, bits: int = 4, processing_class: Any = None,
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Writes the model, `pruning_masks.safetensors`, `pruning_config.json` and a model card README.md.

        Args:
            save_directory (`str`): the folder (created if needed).
            compressed (`bool`, *optional*, defaults to `False`): shorthand for `compression="sparse"`.
            compression (`str`, *optional*): how the weights are stored. `None`: the model's own dense
                `model.safetensors` (pruned entries are zeros; any transformers user can load it). `"sparse"`: the
                targeted weights as their kept values only, in their dtype, in `pruned_weights.safetensors`
                (loads back bit-exact). `"deep"`: Deep Compression (Han et al. 2016), the kept weights of each
                layer clustered into `2**bits` shared values, their cluster indices and the gaps between kept
                positions Huffman coded, in `deep_compressed_weights.safetensors`; exact after training with
                `QuantizationCallback` at the same `bits`, a post-training quantization otherwise. The compressed
                folders load through `PrunedModel.from_pretrained` only.
            bits (`int`, *optional*, defaults to 4): bits per cluster index for `compression="deep"` (1..8).
            processing_class (*optional*): a tokenizer / processor saved into the same folder.
            is_main_process (`bool`, *optional*, defaults to `True`): only the main process writes.
            kwargs: forwarded to the model's `save_pretrained` (`max_shard_size`, ...).
        """
        compression = "sparse" if compressed and compression is None else compression
        if compression not in COMPRESSIONS:
            raise ValueError(f"`compression` must be one of {COMPRESSIONS}; got {compression!r}.")
        if compression == "deep":
            check_bits(bits)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder, {save_directory} is a file.")
        self.apply_masks_()
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        model = self.model
        if compression is None:
            model.save_pretrained(save_directory, **kwargs)
        else:
            model.config.architectures = [type(model).__name__]  # as transformers' save_pretrained does
            model.config.save_pretrained(save_directory)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(save_directory)
            self._save_compressed(save_directory, compression, bits)
        if processing_class is not None:
            processing_class.save_pretrained(save_directory)
        report = self.sparsity_report()
        save_masks(self.masks, os.path.join(save_directory, MASKS_NAME), {"target_sparsity": report.overall})
        config = self.pruning_config
        if config.base_model_name_or_path is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
            config = PruningConfig.from_dict({**config.to_dict(), "base_model_name_or_path": name})
        config.save_pretrained(save_directory, achieved_sparsity=report.overall,
                               sparsity_by_class=report.by_class())
        atomic_write_text(os.path.join(save_directory, "README.md"), self._model_card(report, config))

    def _save_compressed(self, save_directory: str | os.PathLike, compression: str, bits: int) -> None:
        """Targeted weights in the chosen compressed form; every other tensor as it is (tied copies dropped)."""
        others, targeted, seen = {}, {}, set()
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied weight, restored by tie_weights() on load
                continue
            seen.add(tensor.data_ptr())
            (targeted if name in self.masks else others)[name] = tensor.contiguous()
        if compression == "deep":
            quantized = quantize_weights(targeted, self.masks, bits)
            save_deep_compressed(os.path.join(save_directory, DEEP_COMPRESSED_WEIGHTS_NAME), quantized, others,
                                 {"bits": bits})
            return
        values = {f"{name}.values": tensor[self.masks[name]] for name, tensor in targeted.items()}
        atomic_save_safetensors({**values, **others}, os.path.join(save_directory, COMPRESSED_WEIGHTS_NAME),
                                {"format": COMPRESSED_FORMAT, "hf_prune_version": __version__})

    def _model_card(self, report: SparsityReport, config: PruningConfig) -> str:
        data = ModelCardData(library_name="transformers", base_model=config.base_model_name_or_path,
                             tags=["hf_prune", "pruned", "sparse", f"sparsity-{round(100 * report.overall)}"])
        classes = "\n".join(f"| {cls} | {value:.2%} |" for cls, value in report.by_class().items())
        body = (f"# Pruned {type(self.model).__name__}\n\n"
                f"Pruned with [hf_prune](https://pypi.org/project/hf-prune/) {__version__}: "
                f"**{report.overall:.2%}** of the targeted weights are zero "
                f"(schedule `{config.schedule}`, scheme `{config.scheme}`, criterion `{config.criterion}`; "
                f"embeddings, LayerNorms and biases are not pruned).\n\n"
                "Loads with plain transformers (`AutoModel*.from_pretrained`); to keep the masks for further "
                "training use `hf_prune.PrunedModel.from_pretrained` or "
                "`hf_prune.MagnitudePruningCallback.from_pretrained`.\n\n"
                f"## Sparsity by weight class\n\n| class | sparsity |\n|---|---|\n{classes}\n\n"
                f"## Sparsity by layer\n\n{report.to_markdown()}\n")
        return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload pruned model with hf_prune",
                    private: bool | None = None, token: str | None = None, revision: str | None = None,
                    create_pr: bool = False, **save_kwargs: Any) -> Any:
        """Saves to a temporary folder with `save_pretrained(folder, **save_kwargs)` (`compression`, `bits`,
        `processing_class`, ...) and uploads the folder as one commit to `repo_id`; returns the commit info."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, model_class: type | None = None,
                        masks_from_zeros: bool = False, reapply_masks: bool = False,
                        pruning_config: PruningConfig | None = None, **kwargs: Any) -> PrunedModel:
        """Loads a model saved by `save_pretrained` (a folder or a Hub repo id) with its masks.

        Args:
            pretrained_model_name_or_path (`str`): local folder or Hub repo id.
            model_class (`type`, *optional*): the transformers class to load; by default the one named in
                `config.json`'s `architectures` (else `AutoModel`).
            masks_from_zeros (`bool`, *optional*, defaults to `False`): derive the masks from the zero weights of
                a folder without hf_prune files (a model pruned elsewhere); the targets are those of
                `pruning_config` (default `PruningConfig()`).
            reapply_masks (`bool`, *optional*, defaults to `False`): zero pruned weights that are not zero
                instead of raising.
            kwargs: forwarded to the model's `from_pretrained` (`revision`, `dtype`, `device_map`, `token`, ...).

        Raises:
            ValueError: when the masks file is corrupt, names weights the model lacks, has other shapes, or a
                pruned weight is non-zero (without `reapply_masks`).
        """
        path = pretrained_model_name_or_path
        hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        config = transformers.AutoConfig.from_pretrained(path, **hub_kwargs)
        model_class = model_class or auto_model_class(config)
        if masks_from_zeros:
            pruning_config = pruning_config or PruningConfig()
            model = model_class.from_pretrained(path, **kwargs)
            params = dict(model.named_parameters())
            masks = {t.name: params[t.name] != 0 for t in find_targets(model, pruning_config)}
            return cls(model, _restore_dropout(model, masks, pruning_config), pruning_config)

        masks_file = resolve_file(path, MASKS_NAME, **hub_kwargs)
        masks = load_masks(masks_file)
        pruning_config = pruning_config or PruningConfig.from_pretrained(path, **hub_kwargs)
        sparse_file = _optional_file(path, COMPRESSED_WEIGHTS_NAME, hub_kwargs)
        deep_file = _optional_file(path, DEEP_COMPRESSED_WEIGHTS_NAME, hub_kwargs)
        if sparse_file is not None:
            model = _build_model(model_class, config, _read_sparse(sparse_file, masks), sparse_file, kwargs)
        elif deep_file is not None:
            model = _build_model(model_class, config, _read_deep(deep_file, masks), deep_file, kwargs)
        else:
            model = model_class.from_pretrained(path, **kwargs)
        _parameter_names(model, masks)
        params = dict(model.named_parameters())
        revived = [n for n, mask in masks.items() if bool(params[n].detach()[~mask.to(params[n].device)].any())]
        if revived and not reapply_masks:
            raise ValueError(f"Weights pruned by {masks_file} are non-zero in the loaded model: {revived}. The "
                             "weights and masks come from different saves; pass reapply_masks=True to zero them.")
        return cls(model, _restore_dropout(model, masks, pruning_config), pruning_config)


def _gather_unsharded(model: nn.Module, is_main_process: bool) -> nn.Module:
    """An unsharded copy of an FSDP (1 or 2) or ZeRO-3 model: full weights on CPU on the main process, on the meta
    device elsewhere.

    Collective. FSDP: the full state dict is gathered as accelerate does (`get_model_state_dict` with
    `full_state_dict=True, cpu_offload=True`: only the main process receives the tensors; on CPU all do).
    ZeRO-3: one parameter at a time is gathered (`deepspeed.zero.GatheredParameters`) and copied to CPU on the main
    process.
    """
    from torch.distributed.fsdp import FSDPModule

    module = extract_model_from_parallel(model)  # FSDP1 wraps the model; FSDP2 and ZeRO-3 do not
    model_class = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    if any(hasattr(p, "ds_tensor") for p in module.parameters()):
        import deepspeed

        state = dict(module.named_buffers())
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if is_main_process:
                    state[name] = param.detach().cpu().clone()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Offloading (to the main process only) is for accelerator weights: on CPU there is nothing to offload, and
        # FSDP1's offload of CPU tensors crashes (torch 2.13), so every process gets the full state dict there.
        on_cpu = next(module.parameters()).device.type == "cpu"
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu))
    with _without_zero3_init():
        if not is_main_process:
            with torch.device("meta"):
                return model_class(module.config)
        return model_class.from_pretrained(None, config=module.config, state_dict=state)


@contextlib.contextmanager
def _without_zero3_init() -> Iterator[None]:
    """While a ZeRO-3 Trainer lives, transformers partitions every model it builds (`deepspeed.zero.Init`); the
    unsharded copy must stay whole, so the Trainer's DeepSpeed config is hidden from transformers meanwhile."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _restore_dropout(model: nn.Module, masks: Mapping[str, torch.Tensor],
                     config: PruningConfig) -> Mapping[str, torch.Tensor]:
    """Re-applies Han et al.'s dropout adjustment to a loaded model when its config asks for it; returns `masks`."""
    if isinstance(config, HanConfig) and config.adjust_dropout:
        apply_dropout_adjustment(model, masks)
    return masks


def _parameter_names(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Maps each mask's plain transformers parameter name to the model's own name for it (the same, or the
    one inside a peft wrapper: `base_model.model.<name>`, with `.base_layer` for adapted layers); checks shapes."""
    params = dict(model.named_parameters())
    names, problems = {}, []
    for name, mask in masks.items():
        module, _, leaf = name.rpartition(".")
        candidates = (name, f"base_model.model.{name}", f"base_model.model.{module}.base_layer.{leaf}")
        found = next((c for c in candidates if c in params), None)
        if found is None:
            problems.append(f"unexpected mask {name} (no such weight)")
        elif tuple(params[found].shape) != tuple(mask.shape):
            problems.append(f"mask {name} has shape {tuple(mask.shape)}, weight has {tuple(params[found].shape)}")
        else:
            names[name] = found
    if problems:
        raise ValueError("Masks do not match the model: " + "; ".join(problems) + ".")
    return names


def auto_model_class(config: transformers.PretrainedConfig) -> type:
    """The transformers class named in `config.architectures`, else `AutoModel`."""
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _optional_file(path: str | os.PathLike, filename: str, hub_kwargs: dict[str, Any]) -> str | None:
    if os.path.isdir(path):
        local = os.path.join(path, filename)
        return local if os.path.isfile(local) else None
    try:
        return resolve_file(path, filename, **hub_kwargs)
    except EntryNotFoundError:
        return None


def _read_sparse(path: str, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict stored by `save_pretrained(compression="sparse")`, targeted weights made dense again."""
    _, tensors = read_tagged_safetensors(path, COMPRESSED_FORMAT, "compressed checkpoint")
    for name, mask in masks.items():
        values = tensors.pop(f"{name}.values", None)
        if values is None or values.numel() != int(mask.sum()):
            raise ValueError(f"{path} is corrupt: {name} has {None if values is None else values.numel()} stored "
                             f"values, its mask keeps {int(mask.sum())}.")
        tensors[name] = torch.zeros(mask.shape, dtype=values.dtype)
        tensors[name][mask] = values
    return tensors


def _read_deep(path: str, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict stored by `save_pretrained(compression="deep")`, quantized weights dequantized."""
    quantized, others, _ = read_deep_compressed(path)
    mismatched = sorted(n for n in masks.keys() | quantized.keys()
                        if n not in quantized or n not in masks or not torch.equal(quantized[n].mask, masks[n]))
    if mismatched:
        raise ValueError(f"{path} does not match {MASKS_NAME}: the masks of {mismatched} differ.")
    return {**{name: dequantize(q) for name, q in quantized.items()}, **others}


def _build_model(model_class: type, config: transformers.PretrainedConfig, state: dict[str, torch.Tensor],
                 path: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """A `model_class` built from `config` with `state` loaded; tied weights re-tied, every other key checked."""
    model = model_class(config) if model_class is not transformers.AutoModel else model_class.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    by_storage = defaultdict(list)
    for name, tensor in model.state_dict().items():
        by_storage[tensor.data_ptr()].append(name)
    tied = {name for names in by_storage.values() if len(names) > 1 for name in names}
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise ValueError(f"{path} does not match {model_class.__name__}: missing {missing}, unexpected {unexpected}.")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model
