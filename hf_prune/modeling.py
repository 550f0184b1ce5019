"""`PrunedModel`: a model together with its masks, saved, loaded and shared like any transformers model."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch import nn

from .adapters import has_adapters, merge_adapters, without_peft_wrapper
from .compression import (
    check_bits,
    quantize_weights,
    read_deep_state_dict,
    read_sparse,
    save_deep_compressed,
    save_sparse,
)
from .config import PLAIN_FOLDER_HINT, PruningConfig, checkpoint_config
from .constants import COMPRESSED_WEIGHTS_NAME, CONFIG_NAME, DEEP_COMPRESSED_WEIGHTS_NAME, MASKS_NAME
from .distributed import gather_unsharded
from .folders import (
    check_saved_files,
    check_unchanged,
    commit,
    files_under,
    remove_temporaries,
    staging_folder,
    stale_files,
    weights_format,
)
from .hub import HUB_KWARGS, is_hub_repo_id, resolve_file
from .inference import SparseInferenceReport, SparseLinear, to_sparse_inference
from .loading import auto_model_class, config_and_model_kwargs, load_dense, load_generation_config, meta_model
from .masks import check_masks_match, zero_pruned_
from .report import SparsityReport, sparsity_report
from .serialization import atomic_write_text, file_record, load_masks, save_masks
from .structured.shrink import shrink
from .structured.units import pruned_targets, units_for
from .targets import clean_name, named_weights
from .validation import check_choice
from .version import __version__


COMPRESSIONS = (None, "sparse", "deep")


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
        self.masks = {name: mask.to(dtype=torch.bool) for name, mask in masks.items()}
        self._masks_to_their_weights()
        self.apply_masks_()

    def __getattr__(self, name: str) -> Any:
        """`nn.Module`'s (parameters, buffers, submodules: `self.model`); an attribute of the wrapped model is not
        forwarded, and asking for one here says where it is."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is not None and hasattr(model, name):
                raise AttributeError(f"'PrunedModel' object has no attribute {name!r}; it is the wrapped model's: "
                                     f"use pruned.model.{name}.") from None
            raise

    def _apply(self, fn: Any, recurse: bool = True) -> PrunedModel:
        """`nn.Module`'s `to()` / `cuda()` / `cpu()` / `half()`: the masks follow their weights' devices."""
        super()._apply(fn, recurse)
        self._masks_to_their_weights()
        return self

    def _masks_to_their_weights(self) -> None:
        params = dict(self.model.named_parameters())
        self.masks = {name: mask.to(params[self._param_names[name]].device) if self._param_names[name] in params
                      else mask for name, mask in self.masks.items()}

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
        # a layer of to_sparse_inference holds its weight as a sparse buffer that stores no pruned entry
        converted = {f"{name}.weight" for name, module in self.model.named_modules() if isinstance(module, SparseLinear)}
        for name, mask in self.masks.items():
            if self._param_names[name] not in converted:
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

        Without sharding it wraps the trainer's own model and the pruner's masks, not copies: training on afterwards
        changes both together (`copy.deepcopy` it first to keep this state).
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
        """Merges the peft adapters (LoRA, ...) of the wrapped model, a `PeftModel` or a transformers model they were
        injected into (`add_adapter`), into the base weights and re-applies the masks.

        Merging a dense LoRA update would otherwise fill every pruned position; here the update is kept only
        where the weight is kept, so the merged model has exactly the pruned model's sparsity.
        """
        return PrunedModel(merge_adapters(self.model), self.masks, self.pruning_config)

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
                `structure="neurons"`), the model is a peft model (merge its adapters first), or layers were
                converted by `to_sparse_inference`, or the masks lack weights of the config's neurons / heads (made
                under another `structure` or `exclude_modules`). Nothing is changed then.
        """
        if not self.pruning_config.structures():
            raise ValueError("`pruning_config.structure` is 'unstructured': shrink removes whole neurons and heads, "
                             "so prune with PruningConfig(structure='neurons' or 'heads', scheme='class-uniform'); "
                             "for unstructured masks use to_sparse_inference().")
        model = self.get_base_model()
        converted = [name for name, module in model.named_modules() if isinstance(module, SparseLinear)]
        if converted:
            raise ValueError(f"{len(converted)} layers, such as {converted[0]}, were converted by "
                             "to_sparse_inference(); shrink the masked model, or call "
                             "hf_prune.inference.restore_dense_layers(pruned.model) first.")
        return shrink(model, self.masks, units_for(model, self.pruning_config))

    # ----------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, compression: str | None = None, bits: int = 4,
                        processing_class: Any = None, is_main_process: bool = True, compressed: bool | None = None,
                        **kwargs: Any) -> None:
        """Writes the model, `pruning_masks.safetensors`, `pruning_config.json` and a model card README.md.

        The folder changes as one save. Every file is written into a temporary folder inside it first, then renamed
        into place; weights of other formats (and a generation config or peft adapter files the new save lacks:
        transformers would load such an adapter on top of the weights) are removed; last comes
        `pruning_config.json`, which records the sha256 and size of each file of the save (`config.json`, the
        weights file(s), the masks file, `generation_config.json`), checked by `from_pretrained`. A process killed
        at any moment leaves a folder that loads as the previous save, as the new one, or fails with a
        `ValueError` naming the file that belongs to the other save; what a killed save left (`.tmp-*`) is
        ignored on load and removed by the next save (not the staging folder of a save still running).

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
            kwargs: forwarded to the model's `save_pretrained` (`max_shard_size`, ...); with `compression="sparse"`
                or `"deep"`, which write their own file, none is accepted. Upload with `push_to_hub`, not
                `push_to_hub=True` here.

        Raises:
            ValueError: for a peft model (merge its adapters first), a bad `compression` / `bits`, keyword
                arguments a compressed save would not use, or `push_to_hub=True`; nothing is written then.
        """
        if has_adapters(self.model):
            raise ValueError(f"save_pretrained writes a transformers model with its masks; this "
                             f"{type(self.model).__name__} carries peft adapters: merge them first "
                             "(pruned.merge_and_unload().save_pretrained(folder)), or save the adapters alone with "
                             "the peft model's own save_pretrained.")
        if compressed is not None:
            warnings.warn("`compressed` is deprecated; use `compression='sparse'` (or None).", FutureWarning,
                          stacklevel=2)
            if compressed and compression is None:
                compression = "sparse"
        check_choice("compression", compression, COMPRESSIONS)
        if compression == "deep":
            check_bits(bits)
        if kwargs.get("push_to_hub"):  # transformers would push the staging folder, to a repo named after it
            raise ValueError("`push_to_hub=True` is not a save_pretrained option of PrunedModel: call "
                             "pruned.push_to_hub(repo_id, ...) (it saves and uploads in one commit).")
        if compression is not None and kwargs:
            raise ValueError(f"{', '.join(f'`{key}`' for key in sorted(kwargs))} would be ignored: with `compression` "
                             f"{compression!r} the weights go to hf_prune's own file, not through the model's "
                             "save_pretrained; use compression=None for its options.")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder, {save_directory} is a file.")
        self.apply_masks_()
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        remove_temporaries(save_directory)
        with staging_folder(save_directory) as staging:
            model = getattr(self.model, "_orig_mod", self.model)  # torch.compile's wrapper: the model it compiled
            if compression is None:
                model.save_pretrained(staging, **kwargs)
            else:
                model.config.architectures = [type(model).__name__]  # as transformers' save_pretrained does,
                model.config.dtype = str(model.dtype).split(".")[1]  # so a bf16 model reloads as bf16
                model.config.save_pretrained(staging)
                if getattr(model, "generation_config", None) is not None and model.can_generate():
                    model.generation_config.save_pretrained(staging)
                self._save_compressed(model, staging, compression, bits)
            report = self.sparsity_report()
            save_masks(self.masks, os.path.join(staging, MASKS_NAME), {"achieved_sparsity": report.overall},
                       encoding="smallest" if compression == "deep" else "bitmask")
            members = {name: file_record(os.path.join(staging, name)) for name in files_under(staging)}
            if processing_class is not None:
                processing_class.save_pretrained(staging)
            config = self.pruning_config
            if config.base_model_name_or_path is None:
                name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
                config = PruningConfig.from_dict({**config.to_dict(), "base_model_name_or_path": name})
            atomic_write_text(os.path.join(staging, "README.md"),
                              self._model_card(model, report, config, compression))
            commit(staging, save_directory, members)
            # last: until this rename the folder's pruning_config.json records the files of the previous save
            config.save_pretrained(save_directory, achieved_sparsity=report.overall,
                                   sparsity_by_class=report.by_class(), files=members)

    def _save_compressed(self, model: nn.Module, save_directory: str | os.PathLike, compression: str,
                         bits: int) -> None:
        """`model`'s targeted weights in the chosen compressed form; every other tensor as it is (tied copies
        dropped)."""
        others, targeted, seen = {}, {}, set()
        for name, tensor in model.state_dict().items():
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

    def _model_card(self, model: nn.Module, report: SparsityReport, config: PruningConfig,
                    compression: str | None) -> str:
        """The folder's README.md: the Hub's metadata (the base model only where it is a Hub repo id, not a local
        path, which the Hub refuses) and what the save holds and which loader reads it."""
        base_model = config.base_model_name_or_path
        data = ModelCardData(library_name="transformers" if compression is None else None,
                             base_model=base_model if base_model is not None and is_hub_repo_id(base_model) else None,
                             tags=["hf_prune", "pruned", "sparse", f"sparsity-{round(100 * report.overall)}"])
        if compression is None:
            loading = ("Loads with plain transformers (`AutoModel*.from_pretrained`); to keep the masks for further "
                       "training use `hf_prune.PrunedModel.from_pretrained` or "
                       "`hf_prune.MagnitudePruningCallback.from_pretrained`.")
        else:
            weights = DEEP_COMPRESSED_WEIGHTS_NAME if compression == "deep" else COMPRESSED_WEIGHTS_NAME
            loading = (f"The weights are stored compressed (`compression=\"{compression}\"`, in `{weights}`), which "
                       "plain transformers cannot read: load with `hf_prune.PrunedModel.from_pretrained`, whose "
                       "`.model` is an ordinary transformers model (its `save_pretrained` writes a folder that "
                       "`AutoModel*.from_pretrained` loads).")
        classes = "\n".join(f"| {cls} | {value:.2%} |" for cls, value in report.by_class().items())
        body = (f"# Pruned {type(model).__name__}\n\n"
                f"Pruned with [hf_prune](https://pypi.org/project/hf-prune/) {__version__}: "
                f"**{report.overall:.2%}** of the targeted weights are zero "
                f"(schedule `{config.schedule}`, scheme `{config.scheme}`, criterion `{config.criterion}`; "
                f"{self._card_structure(config)}).\n\n{loading}\n\n"
                f"## Sparsity by weight class\n\n| class | sparsity |\n|---|---|\n{classes}\n\n"
                f"## Sparsity by layer\n\n{report.to_markdown()}\n")
        return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))

    @staticmethod
    def _card_structure(config: PruningConfig) -> str:
        """What the card says was pruned, and what was not."""
        kinds = config.structures()
        if not kinds:
            return "embeddings, LayerNorms and biases are not pruned"
        groups = " and ".join({"neurons": "feed-forward neurons", "heads": "attention heads"}[k] for k in kinds)
        return (f"whole {groups} pruned (structure `{'`, `'.join(kinds)}`), their biases zero as well; embeddings "
                "and LayerNorms are not pruned. `hf_prune.PrunedModel.shrink()` removes the pruned groups, giving a "
                "smaller standard model")

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload pruned model with hf_prune",
                    commit_description: str | None = None, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, create_pr: bool = False, tags: list[str] | None = None,
                    **save_kwargs: Any) -> Any:
        """Saves to a temporary folder with `save_pretrained(folder, **save_kwargs)` (`compression`, `bits`,
        `processing_class`, ...) and uploads the folder as one commit to `repo_id`; returns the commit info.
        `tags` are added to the model card's own (`hf_prune`, `pruned`, `sparse`, `sparsity-NN`).

        The same commit deletes the weights files at the repo's root of the formats this save does not write (and
        a generation config or peft adapter it does not have), as `save_pretrained` does in a folder: the root holds
        one save; subfolders are left alone. `create_pr=True` with a `revision` other than main is a `ValueError`. On a process
        that is not the main one (`is_main_process=False`) nothing is saved or uploaded, and it returns None."""
        if not save_kwargs.get("is_main_process", True):
            self.apply_masks_()  # as save_pretrained does on every process
            return None
        if create_pr and revision not in (None, "main"):
            raise ValueError(f"`create_pr=True` opens a pull request against main; got `revision` {revision!r} as "
                             "well (huggingface_hub's upload_folder refuses both). Push to the branch, or open the "
                             "pull request.")
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):  # as transformers' push_to_hub does
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            if tags:
                card = ModelCard.load(os.path.join(folder, "README.md"))
                card.data.tags = [*card.data.tags, *(tag for tag in tags if tag not in card.data.tags)]
                card.save(os.path.join(folder, "README.md"))
            # the root's files of another save, by name: a pattern would reach other saves in subfolders too
            stale = stale_files(api.list_repo_files(repo_id, revision=revision), files_under(folder))
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     commit_description=commit_description, revision=revision,
                                     create_pr=create_pr, delete_patterns=stale or None)

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
                `pruning_config` (default `PruningConfig()`), and each of them must be in the folder (another
                head may be newly initialised).
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
        if "output_loading_info" in kwargs:
            raise ValueError("`output_loading_info` is not an option of PrunedModel.from_pretrained: it checks the "
                             "loading info itself, and refuses a folder whose weights do not all load.")
        hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        trust_remote_code = kwargs.get("trust_remote_code")
        if masks_from_zeros:
            config, _ = config_and_model_kwargs(path, kwargs, hub_kwargs)
            model_class = model_class or auto_model_class(config)
            pruning_config = pruning_config or PruningConfig()

            def targeted(model: nn.Module) -> list[str]:
                return [t.name for t in pruned_targets(model, pruning_config)]

            # the weights the masks come from must load (another head, newly initialised, may not)
            model = load_dense(model_class, path, config, kwargs, needed=targeted)
            params = named_weights(model)
            masks = {name: params[name] != 0 for name in targeted(model)}
            pruning_config.prepare_loaded_model(model, masks)
            return cls(model, masks, pruning_config)

        kind, weights_file = weights_format(path, hub_kwargs)
        config_file = _hf_prune_file(path, CONFIG_NAME, False, hub_kwargs)
        if config_file is None and pruning_config is None and checkpoint_config(path, hub_kwargs) is None:
            _hf_prune_file(path, CONFIG_NAME, True, hub_kwargs)  # raises, with what loads the folder instead
        checked = check_saved_files(path, config_file, hub_kwargs) if config_file is not None else {}
        pruning_config = pruning_config or PruningConfig.from_pretrained(path, **hub_kwargs)
        config, model_kwargs = config_and_model_kwargs(path, kwargs, hub_kwargs)
        model_class = model_class or auto_model_class(config)
        masks_file = _hf_prune_file(path, MASKS_NAME, True, hub_kwargs)
        # names and shapes, checked before anything is allocated
        skeleton = meta_model(model_class, config, trust_remote_code)
        masks = load_masks(masks_file, {name: tuple(p.shape) for name, p in skeleton.named_parameters()})
        if kind == "dense":
            model = load_dense(model_class, path, config, kwargs)
        else:
            shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
            read = read_sparse if kind == "sparse" else read_deep_state_dict
            # the class the skeleton resolved to (AutoModel* of custom code needs a folder to resolve it in)
            state_dict = read(weights_file, masks, shapes)
            model = load_dense(type(skeleton), path, config, model_kwargs, state_dict=state_dict)
            load_generation_config(model, path, hub_kwargs)
        check_unchanged(checked)  # nothing was replaced while it was read
        names = _parameter_names(model, masks)  # the model's own names: a peft adapter may have been loaded too
        params = dict(model.named_parameters())
        revived = [n for n, mask in masks.items()
                   if bool(params[names[n]].detach()[~mask.to(params[names[n]].device)].any())]
        if revived and not reapply_masks:
            raise ValueError(f"Weights pruned by {masks_file} are non-zero in the loaded model: {revived}. The "
                             "weights and masks come from different saves; pass reapply_masks=True to zero them.")
        pruning_config.prepare_loaded_model(model, masks)
        return cls(model, masks, pruning_config)

    # -------------------------------------------------------------------------------------------- inference
    def to_sparse_inference(self, layers: list[str] | None = None, **options: Any) -> SparseInferenceReport:
        """Makes the masked Linear layers multiply with a sparse weight where that is faster than the dense product
        (`hf_prune.inference.SparseLinear`: CSR/BSR on CPU, 2:4 on CUDA), in place, and puts the model in eval
        mode. Outputs stay equal within float tolerance; `forward`, `generate` and batching work as before.

        ```python
        pruned = PrunedModel.from_pretrained("out")     # 90% unstructured
        report = pruned.to_sparse_inference(num_tokens=32 * 64)
        print(report)                                    # which layers went sparse, measured speedups
        ```

        The converted model is for inference: the sparse weights are buffers, and a backward pass through them
        raises (`hf_prune.inference.restore_dense_layers(pruned.model)` undoes the conversion). `save_pretrained`,
        `sparsity_report` and `apply_masks_` keep working: the sparse layers save their dense weights.

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
        report = to_sparse_inference(self.model, self.masks, layers, **options)
        self.eval()
        return report


def _hf_prune_file(path: str | os.PathLike, filename: str, required: bool, hub_kwargs: Mapping[str, Any]
                   ) -> str | None:
    """`resolve_file`, with what loads the folder instead in the error: `pruning_config=` beside a masks file,
    else `masks_from_zeros=True`."""
    try:
        return resolve_file(path, filename, required=required, **hub_kwargs)
    except FileNotFoundError as err:
        try:
            has_masks = filename != MASKS_NAME and resolve_file(path, MASKS_NAME, required=False, **hub_kwargs)
        except FileNotFoundError:
            has_masks = False
        hint = (f"It has {MASKS_NAME}: pass pruning_config=PruningConfig(...), the config they were pruned under."
                if has_masks else PLAIN_FOLDER_HINT)
        raise FileNotFoundError(f"{err} {hint}") from None


def _parameter_names(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Maps each mask's plain transformers parameter name (`clean_name`) to the model's own name for it (the same,
    or the one inside a peft wrapper, FSDP1 or `torch.compile`: `base_model.model.<module>.base_layer.weight`, ...);
    checks shapes. For a peft `modules_to_save` layer that is the trained copy's."""
    inner = without_peft_wrapper(model)
    prefix = next(f"{name}." for name, module in model.named_modules() if module is inner).lstrip(".")
    own = {clean_name(name): prefix + name for name, _ in inner.named_parameters()}
    names = {name: own[name] for name in masks if name in own}
    params = dict(model.named_parameters())
    check_masks_match(masks, {name: tuple(params[found].shape) for name, found in names.items()}, require_all=False)
    return names
