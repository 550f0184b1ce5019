"""`PrunedModel`: a model together with its masks, saved, loaded and shared like any transformers model."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch import nn
from transformers.utils import (
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .compression import (
    check_bits,
    quantize_weights,
    read_deep_state_dict,
    read_sparse,
    save_deep_compressed,
    save_sparse,
)
from .config import PruningConfig
from .constants import COMPRESSED_WEIGHTS_NAME, CONFIG_NAME, DEEP_COMPRESSED_WEIGHTS_NAME, MASKS_NAME, TEMP_PREFIX
from .distributed import gather_unsharded
from .hub import HUB_KWARGS, resolve_file
from .masks import check_masks_match, zero_pruned_
from .report import SparsityReport, sparsity_report
from .serialization import atomic_write_text, file_record, is_count, load_masks, read_json_object, save_masks
from .structured.shrink import shrink
from .structured.units import units_for
from .targets import find_targets
from .validation import check_choice
from .version import __version__


COMPRESSIONS = (None, "sparse", "deep")
#: The weights file(s) of each way a folder can hold the model's weights; one folder holds one of them.
WEIGHT_FORMATS = {SAFE_WEIGHTS_NAME: "dense", SAFE_WEIGHTS_INDEX_NAME: "dense, sharded", WEIGHTS_NAME: "dense",
                  WEIGHTS_INDEX_NAME: "dense, sharded", COMPRESSED_WEIGHTS_NAME: "sparse",
                  DEEP_COMPRESSED_WEIGHTS_NAME: "deep"}
#: transformers' weights files: one file or shards and their index, safetensors or the older .bin.
_DENSE_WEIGHTS_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
#: What `push_to_hub` deletes from the repo unless the new save uploads it (the same files as `_commit` removes).
_STALE_PATTERNS = (*WEIGHT_FORMATS, "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin", GENERATION_CONFIG_NAME)


class PrunedModel(nn.Module):
    """A transformers model and its pruning masks (parameter name -> `torch.bool`, True = kept).

    `forward`, `generate` and `config` are the wrapped model's; everything else of it is reached explicitly
    through `pruned.model` (or `get_base_model()`, as in peft). The pruned weights are exactly zero in it. `save_pretrained` writes the model's own files, with the
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

    def get_base_model(self) -> nn.Module:
        """The wrapped model (`self.model`), with the pruned weights as zeros."""
        return self.model

    @property
    def config(self) -> transformers.PretrainedConfig:
        """The wrapped model's transformers config."""
        return self.model.config

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
        return cls(gather_unsharded(trainer.model, trainer.is_world_process_zero()), masks, callbacks[0].config)

    def merge_and_unload(self) -> PrunedModel:
        """Merges the adapters of a wrapped `PeftModel` (LoRA, ...) into the base weights and re-applies the masks.

        Merging a dense LoRA update would otherwise fill every pruned position; here the update is kept only
        where the weight is kept, so the merged model has exactly the pruned model's sparsity.
        """
        return PrunedModel(self.model.merge_and_unload(), self.masks, self.pruning_config)

    def shrink(self) -> transformers.PreTrainedModel:
        """An ordinary transformers model without the pruned neurons and heads, its config updated
        (`intermediate_size`, `num_attention_heads` / `num_key_value_heads` where the config has an explicit
        `head_dim`): smaller and faster in plain transformers. Its own `save_pretrained` folder loads with
        `AutoModel*.from_pretrained`, and its outputs equal this model's.

        ```python
        pruned = PrunedModel.from_trainer(trainer)   # trained with PruningConfig(structure="neurons",
        small = pruned.shrink()                       #   scheme="class-uniform")
        small.save_pretrained("minilm-sst2-small")
        ```

        Raises:
            ValueError: when the masks are not structured (`pruning_config.structure` is "unstructured", or
                groups are pruned in part), the layers keep different widths (`scheme="class-blind"`), or the
                config cannot express fewer heads (BERT-, GPT-2-, BART-style and T5 configs: use
                `structure="neurons"`). Nothing is changed then.
        """
        if not self.pruning_config.structures():
            raise ValueError("`pruning_config.structure` is 'unstructured': shrink removes whole neurons and heads, "
                             "so prune with PruningConfig(structure='neurons' or 'heads', scheme='class-uniform'); "
                             "for unstructured masks use to_sparse_inference().")
        model = self.get_base_model()
        return shrink(model, self.masks, units_for(model, self.pruning_config))

    # ----------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, compression: str | None = None, bits: int = 4,
                        processing_class: Any = None, is_main_process: bool = True, compressed: bool | None = None,
                        **kwargs: Any) -> None:
        """Writes the model, `pruning_masks.safetensors`, `pruning_config.json` and a model card README.md.

        The folder changes as one save. Every file is written into a temporary folder inside it first, then renamed
        into place; weights of other formats (and a generation config the new save lacks) are removed; last comes
        `pruning_config.json`, which records the sha256 and size of each file of the save (`config.json`, the
        weights file(s), the masks file, `generation_config.json`), checked by `from_pretrained`. A process killed
        at any moment leaves a folder that loads as the previous save, as the new one, or fails with a
        `ValueError` naming the file that belongs to the other save; what a killed save left (`.tmp-*`) is
        ignored on load and removed by the next save.

        Args:
            save_directory (`str`): the folder (created if needed).
            compression (`str`, *optional*): how the weights are stored. `None`: the model's own dense
                `model.safetensors` (pruned entries are zeros; any transformers user can load it). `"sparse"`: the
                targeted weights as their kept values only, in their dtype, in `pruned_weights.safetensors`
                (loads back bit-exact). `"deep"`: Deep Compression (Han et al. 2016), the kept weights of each
                layer clustered into `2**bits` shared values and their cluster indices Huffman coded, in
                `deep_compressed_weights.safetensors`; the kept positions are stored once, in the masks file,
                as Huffman-coded gaps when that is smaller than 1 bit per weight. Exact after training with
                `QuantizationCallback` at the same `bits`, a post-training quantization otherwise. The compressed
                folders load through `PrunedModel.from_pretrained` only.
            bits (`int`, *optional*, defaults to 4): bits per cluster index for `compression="deep"` (1..8).
            processing_class (*optional*): a tokenizer / processor saved into the same folder.
            is_main_process (`bool`, *optional*, defaults to `True`): only the main process writes.
            compressed (`bool`, *optional*): deprecated, `compressed=True` is `compression="sparse"`.
            kwargs: forwarded to the model's `save_pretrained` (`max_shard_size`, ...).
        """
        if compressed is not None:
            warnings.warn("`compressed` is deprecated; use `compression='sparse'` (or None).", FutureWarning,
                          stacklevel=2)
            if compressed and compression is None:
                compression = "sparse"
        check_choice("compression", compression, COMPRESSIONS)
        if compression == "deep":
            check_bits(bits)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder, {save_directory} is a file.")
        self.apply_masks_()
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        _remove_temporaries(save_directory)
        staging = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=save_directory)
        try:
            model = self.model
            if compression is None:
                model.save_pretrained(staging, **kwargs)
            else:
                model.config.architectures = [type(model).__name__]  # as transformers' save_pretrained does
                model.config.save_pretrained(staging)
                if getattr(model, "generation_config", None) is not None and model.can_generate():
                    model.generation_config.save_pretrained(staging)
                self._save_compressed(staging, compression, bits)
            report = self.sparsity_report()
            save_masks(self.masks, os.path.join(staging, MASKS_NAME), {"achieved_sparsity": report.overall},
                       encoding="smallest" if compression == "deep" else "bitmask")
            members = {name: file_record(os.path.join(staging, name)) for name in _files_under(staging)}
            if processing_class is not None:
                processing_class.save_pretrained(staging)
            config = self.pruning_config
            if config.base_model_name_or_path is None:
                name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
                config = PruningConfig.from_dict({**config.to_dict(), "base_model_name_or_path": name})
            atomic_write_text(os.path.join(staging, "README.md"), self._model_card(report, config))
            _commit(staging, save_directory, members)
            # last: until this rename the folder's pruning_config.json records the files of the previous save
            config.save_pretrained(save_directory, achieved_sparsity=report.overall,
                                   sparsity_by_class=report.by_class(), files=members)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _save_compressed(self, save_directory: str | os.PathLike, compression: str, bits: int) -> None:
        """Targeted weights in the chosen compressed form; every other tensor as it is (tied copies dropped)."""
        others, targeted, seen = {}, {}, set()
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied weight, restored by tie_weights() on load
                continue
            seen.add(tensor.data_ptr())
            (targeted if name in self.masks else others)[name] = tensor.contiguous()
        if compression == "deep":  # the positions are stored once, in the (gap-coded) masks file
            quantized = quantize_weights(targeted, self.masks, bits)
            save_deep_compressed(os.path.join(save_directory, DEEP_COMPRESSED_WEIGHTS_NAME), quantized, others,
                                 {"bits": bits}, store_positions=False)
        else:
            save_sparse(os.path.join(save_directory, COMPRESSED_WEIGHTS_NAME), targeted, self.masks, others)

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
        `processing_class`, ...) and uploads the folder as one commit to `repo_id`; returns the commit info.

        The same commit deletes the repo's weights files of the formats this save does not write (and a generation
        config it does not have), as `save_pretrained` does in a folder: the repo holds one save."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr, delete_patterns=list(_STALE_PATTERNS))

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
            ValueError: when a file of the folder is not the one `pruning_config.json` records (a folder mixing
                two saves), the folder holds the weights in two formats, the weights do not fill the model (a
                weight left newly initialised or a saved tensor without a place: another head), the masks file is
                corrupt, names weights the model lacks or has other shapes (checked before it is decoded), or a
                pruned weight is non-zero (without `reapply_masks`).
        """
        path = pretrained_model_name_or_path
        hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        if masks_from_zeros:
            config = transformers.AutoConfig.from_pretrained(path, **hub_kwargs)
            model_class = model_class or auto_model_class(config)
            pruning_config = pruning_config or PruningConfig()
            model = model_class.from_pretrained(path, **kwargs)
            params = dict(model.named_parameters())
            masks = {t.name: params[t.name] != 0 for t in find_targets(model, pruning_config)}
            pruning_config.prepare_loaded_model(model, masks)
            return cls(model, masks, pruning_config)

        kind, weights_file = _weights_file(path, hub_kwargs)
        config_file = resolve_file(path, CONFIG_NAME, required=pruning_config is None, **hub_kwargs)
        if config_file is not None:
            _check_saved_files(path, config_file, hub_kwargs)
        pruning_config = pruning_config or PruningConfig.from_pretrained(path, **hub_kwargs)
        config = transformers.AutoConfig.from_pretrained(path, **hub_kwargs)
        model_class = model_class or auto_model_class(config)
        masks_file = resolve_file(path, MASKS_NAME, **hub_kwargs)
        if kind == "dense":
            model = _load_dense(model_class, path, config, kwargs)
        else:
            model = _new_model(model_class, config)
        masks = load_masks(masks_file, {name: tuple(p.shape) for name, p in model.named_parameters()})
        if kind != "dense":
            shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
            read = read_sparse if kind == "sparse" else read_deep_state_dict
            model = _load_state(model, read(weights_file, masks, shapes), weights_file, kwargs)
        _parameter_names(model, masks)
        params = dict(model.named_parameters())
        revived = [n for n, mask in masks.items() if bool(params[n].detach()[~mask.to(params[n].device)].any())]
        if revived and not reapply_masks:
            raise ValueError(f"Weights pruned by {masks_file} are non-zero in the loaded model: {revived}. The "
                             "weights and masks come from different saves; pass reapply_masks=True to zero them.")
        pruning_config.prepare_loaded_model(model, masks)
        return cls(model, masks, pruning_config)

    # -------------------------------------------------------------------------------------------- inference
    def to_sparse_inference(self, layers: list[str] | None = None, **options: Any) -> Any:
        """Makes the masked Linear layers multiply with a sparse weight where that is faster than the dense product
        (`hf_prune.inference.SparseLinear`: CSR/BSR on CPU, 2:4 on CUDA), in place, and puts the model in eval
        mode. Outputs stay equal within float tolerance; `forward`, `generate` and batching work as before.

        ```python
        pruned = PrunedModel.from_pretrained("out")     # 90% unstructured
        report = pruned.to_sparse_inference(num_tokens=32 * 64)
        print(report)                                    # which layers went sparse, measured speedups
        ```

        The converted model is for inference: the sparse weights are buffers, and a backward pass through them
        raises. Save before converting (`hf_prune.inference.restore_dense_layers(pruned.model)` undoes it).

        Args:
            layers (`list[str]`, *optional*): module names of the masked layers to consider (default: all).
            options: `kernel` (`"auto"`, `"sparse"`, `"dense"`), `measure`, `num_tokens`, `repeats`,
                `min_speedup`, `min_sparsity`: see `hf_prune.inference.select_kernel`, which makes the decision.

        Returns:
            `hf_prune.inference.SparseInferenceReport`: the decision for every considered layer.

        Raises:
            ValueError: without masks, for a layer that is not a masked `nn.Linear` / `Conv1D` of the model, or
                an invalid option; nothing is changed then.
        """
        from .inference import to_sparse_inference

        report = to_sparse_inference(self.model, self.masks, layers, **options)
        self.eval()
        return report


def _parameter_names(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Maps each mask's plain transformers parameter name to the model's own name for it (the same, or the
    one inside a peft wrapper: `base_model.model.<name>`, with `.base_layer` for adapted layers); checks shapes."""
    params = dict(model.named_parameters())
    names = {}
    for name in masks:
        module, _, leaf = name.rpartition(".")
        candidates = (name, f"base_model.model.{name}", f"base_model.model.{module}.base_layer.{leaf}")
        found = next((c for c in candidates if c in params), None)
        if found is not None:
            names[name] = found
    check_masks_match(masks, {name: tuple(params[found].shape) for name, found in names.items()}, require_all=False)
    return names


def auto_model_class(config: transformers.PretrainedConfig) -> type:
    """The transformers class named in `config.architectures`, else `AutoModel`."""
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _new_model(model_class: type, config: transformers.PretrainedConfig) -> nn.Module:
    """A freshly initialised `model_class` (a model class, or an `AutoModel*` class) of `config`."""
    from_config = getattr(model_class, "from_config", None)  # the AutoModel* classes
    return from_config(config) if from_config is not None else model_class(config)


def parameter_shapes(config: transformers.PretrainedConfig, model_class: type | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of `model_class` (default: the class `config` names) built on the meta device: what
    a masks file may name, known before anything is allocated."""
    with torch.device("meta"):
        model = _new_model(model_class or auto_model_class(config), config)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """`model` with `state` loaded; tied weights re-tied, every other key checked."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    by_storage = defaultdict(list)
    for name, tensor in model.state_dict().items():
        by_storage[tensor.data_ptr()].append(name)
    tied = {name for names in by_storage.values() if len(names) > 1 for name in names}
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise ValueError(f"{path} does not match {type(model).__name__}: missing {missing}, unexpected {unexpected}.")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def _load_dense(model_class: type, path: str | os.PathLike, config: transformers.PretrainedConfig,
                kwargs: Mapping[str, Any]) -> nn.Module:
    """`model_class.from_pretrained(path)`, refused when a saved tensor did not load or a weight was left newly
    initialised (transformers only lists those in its load report): a folder saved from another head."""
    kwargs = {key: value for key, value in kwargs.items() if key != "output_loading_info"}
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {"weights the folder lacks (they would be random)": sorted(info.get("missing_keys") or ()),
                "saved tensors the model has no place for": sorted(info.get("unexpected_keys") or ()),
                "saved tensors of another shape": sorted(str(key) for key in info.get("mismatched_keys") or ()),
                "errors": list(info.get("error_msgs") or ())}
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        raise ValueError(f"{path} does not load as {type(model).__name__} (config.json's architectures: "
                         f"{getattr(config, 'architectures', None)}): "
                         + "; ".join(f"{what}: {keys}" for what, keys in problems.items())
                         + ". Pass model_class= the class the folder was saved from.")
    return model


def _weights_file(path: str | os.PathLike, hub_kwargs: Mapping[str, Any]) -> tuple[str, str | None]:
    """Which format holds the weights (`"dense"`, `"sparse"` or `"deep"`) and its file (for `"dense"`, the one
    transformers reads; `None` when there is none, and transformers reports that).

    Raises:
        ValueError: when the folder holds the weights in two formats (a file left by an older save).
    """
    # on the Hub, a stale pickled .bin beside the weights would be downloaded only to be refused: not looked for
    names = [name for name in WEIGHT_FORMATS if os.path.isdir(path) or not name.startswith("pytorch_model")]
    found = {name: local for name in names if (local := resolve_file(path, name, required=False, **hub_kwargs))}
    if len(found) > 1:
        raise ValueError(f"{path} holds the weights in {len(found)} formats: "
                         + ", ".join(f"{name} ({WEIGHT_FORMATS[name]})" for name in found)
                         + "; a folder holds one save. Delete the files of the formats you do not want, or save "
                         "again with PrunedModel.save_pretrained (it removes the others).")
    name, local = next(iter(found.items()), (None, None))
    kind = "dense" if name is None or WEIGHT_FORMATS[name].startswith("dense") else WEIGHT_FORMATS[name]
    return kind, local


def _check_saved_files(path: str | os.PathLike, config_file: str, hub_kwargs: Mapping[str, Any]) -> None:
    """Checks every file `pruning_config.json` (`config_file`) records as part of its save (`files`: name ->
    sha256 and size) against the file of that name in `path`; a folder without a record (written before hf_prune
    recorded its files) passes.

    Raises:
        ValueError: naming the first file that is missing or differs from the recorded one: the folder mixes
            two saves (an interrupted `save_pretrained`) or was edited.
    """
    records = read_json_object(config_file, "a PruningConfig").get("files")
    if records is None:
        return
    if not isinstance(records, dict) or not all(
            os.path.basename(name) == name and name not in ("", ".", "..") and isinstance(record, dict)
            and isinstance(record.get("sha256"), str) and is_count(record.get("size")) for name, record in records.items()):
        raise ValueError(f"{config_file} is corrupt: `files` must map file names to {{\"sha256\": hex digest, "
                         f"\"size\": bytes}}; got {str(records)[:120]}.")
    for name, record in records.items():
        local = resolve_file(path, name, required=False, **hub_kwargs)
        if local is None:
            raise ValueError(f"{path} has no {name}, which {config_file} records as part of its save: the folder is "
                             "incomplete or mixes two saves (an interrupted save_pretrained?). Save the model again.")
        found = {"size": os.path.getsize(local)}
        if found["size"] == record["size"]:
            found = file_record(local)
        if (found["size"], found.get("sha256")) != (record["size"], record["sha256"]):
            raise ValueError(f"{local} does not belong to the save that {config_file} records (found "
                             f"{_describe(found)}, recorded {_describe(record)}): the folder mixes files of two "
                             "saves (an interrupted save_pretrained?) or the file was changed after saving. Save the "
                             f"model again; to load the folder as it is, delete the `files` entry of {config_file}.")


def _describe(record: Mapping[str, Any]) -> str:
    digest = f", sha256 {record['sha256'][:16]}..." if "sha256" in record else ""
    return f"{record['size']} bytes{digest}"


def _files_under(folder: str) -> list[str]:
    """The files in `folder` and its subfolders, as paths relative to it."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def _is_weights_file(name: str) -> bool:
    return bool(_DENSE_WEIGHTS_FILE.fullmatch(name)) or name in WEIGHT_FORMATS


def _remove_temporaries(folder: str) -> None:
    """Removes what interrupted writes left in `folder` (names starting with `TEMP_PREFIX`)."""
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            target = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)


def _commit(staging: str, folder: str, members: Mapping[str, Any]) -> None:
    """Moves every file of `staging` into `folder` (the save's own files last), then removes the weights of other
    formats and a generation config that the new save does not have."""
    for name in sorted(_files_under(staging), key=lambda name: name in members):
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        os.replace(os.path.join(staging, name), os.path.join(folder, name))
    for name in os.listdir(folder):
        if name not in members and (_is_weights_file(name) or name == GENERATION_CONFIG_NAME):
            os.remove(os.path.join(folder, name))
