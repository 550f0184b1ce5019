"""`PruningConfig`: what to prune, how much, and when; a JSON-serialisable dataclass."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .constants import CONFIG_NAME, MASKS_NAME
from .criteria import CRITERIA
from .hub import resolve_file
from .masks import SCHEMES
from .schedules import SCHEDULES
from .serialization import atomic_write_text, read_json_object, read_masks_metadata
from .structured.selection import STRUCTURED_SCHEMES
from .structured.units import STRUCTURES
from .validation import check_bool, check_choice, check_fraction, check_int, missing_attribute
from .version import __version__


logger = logging.getLogger(__name__)

CLASS_GRANULARITIES = ("role", "tensor")
#: What `PrunedModel.save_pretrained` writes into `pruning_config.json` beside the fields (ignored on load):
#: `files` records the sha256 and size of each file of the save, checked by `PrunedModel.from_pretrained`.
SAVE_RECORD_KEYS = ("hf_prune_version", "achieved_sparsity", "sparsity_by_class", "files")


def _check_patterns(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"`{name}` is not a valid regular expression ({err}); got {value!r}.") from None
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value) or not value:
        raise ValueError(
            f"`{name}` must be a regex string or a non-empty list of module-name suffixes; got {value!r}."
        )


@dataclass
class PruningConfig:
    """Configuration of a pruning run: the sparsity schedule, the ranking scheme and the targeted weights.

    Args:
        initial_sparsity (`float`, *optional*, defaults to `0.0`):
            Fraction of the targeted weights pruned at `start_step` (X in Cheong & Daniel 2019).
        final_sparsity (`float`, *optional*, defaults to `0.5`):
            Fraction pruned at the end of the schedule and held to the end of training (Y).
        schedule (`str`, *optional*, defaults to `"cubic"`):
            `"oneshot"` (prune to `final_sparsity` at `start_step`), `"iterative"` (X at `start_step`, then
            equal increments every `pruning_frequency` steps), or `"cubic"` (Zhu & Gupta 2017).
        start_step (`int`, *optional*, defaults to `0`):
            Optimizer step of the first pruning event.
        end_step (`int`, *optional*):
            Optimizer step by which `final_sparsity` is reached. Defaults to
            `min(start_step + 10_000, int(0.75 * max_steps))` of the Trainer run.
        pruning_frequency (`int`, *optional*):
            Optimizer steps between pruning events. Defaults to `1001 * (end_step - start_step) / 10_000`
            (at least 1), i.e. Cheong & Daniel's 1001 steps for a 10,000-step window, scaled for shorter runs.
        scheme (`str`, *optional*, defaults to `"class-blind"`):
            See et al. 2016: `"class-blind"` ranks all targeted weights together, `"class-uniform"` prunes the
            same fraction of every weight class, `"class-distribution"` prunes `|w| < λ·σ_c` in each class `c`
            with λ solved so the total hits the target.
        criterion (`str`, *optional*, defaults to `"magnitude"`):
            The score weights are ranked by; the lowest are pruned. `"magnitude"`: |w|. `"obd"`: Optimal Brain
            Damage, ½·F_ii·w_i² with F the mean squared gradient of the `fisher_steps` optimizer steps before each
            pruning event: set `start_step >= fisher_steps` so the first event has a full window (an event
            with no gradients before it, e.g. at step 0, is an error; see `hf_prune.criteria.OBDCriterion`).
            `"wanda"`: |w_ij|·‖x_j‖₂ (Sun et al. 2024), with the layer inputs of the same window.
        fisher_steps (`int`, *optional*, defaults to `100`):
            With `criterion="obd"`: how many optimizer steps of gradients each pruning event's Fisher estimate
            averages (steps `e - fisher_steps + 1 ... e` for the event at step `e`); with `criterion="wanda"`,
            the steps whose forward passes give the input norms. Its float32 accumulators exist only during those
            steps.
        class_granularity (`str`, *optional*, defaults to `"role"`):
            What a weight class is: `"role"` groups one role across layers (every layer's attention query),
            `"tensor"` makes each weight matrix its own class.
        target_modules (`str` or `list[str]`, *optional*):
            Modules to prune instead of the default (the Linear / Conv1D layers inside the Transformer blocks).
            A string is a regex matched against the full module name; a list matches exact names or suffixes.
        exclude_modules (`str` or `list[str]`, *optional*):
            Modules never pruned, with the same matching rule.
        prune_head (`bool`, *optional*, defaults to `False`):
            Also prune the Linear layers outside the blocks (pooler, task head). A head tied to the input
            embeddings is never pruned.
        structure (`str` or `list[str]`, *optional*, defaults to `"unstructured"`):
            What is pruned together. `"unstructured"`: single weights. `"neurons"`: feed-forward neurons (a row of
            the up / gate projections with its bias, and the matching column of the down projection). `"heads"`:
            attention heads (their rows of Q / K / V with biases, and the columns of the output projection; with
            grouped-query attention a key/value head with all its query heads). `["neurons", "heads"]`: both.
            The targets are then the weights the structure can remove, `final_sparsity` their zero fraction
            (exact to one neuron or head over the model under `class-blind`, to whole ones per block under
            `class-uniform`), a group's score its entries' scores summed (the L2 norm for
            `"magnitude"`), `scheme` `"class-uniform"` (every layer keeps the same width, so `PrunedModel.shrink`
            gives a standard config) or `"class-blind"` (all layers' groups ranked together), and
            `target_modules` unset and `prune_head` off (`exclude_modules` leaves blocks out). See
            `hf_prune.structured`.
        base_model_name_or_path (`str`, *optional*):
            The model the run started from; filled in when a pruned model is saved.
    """

    initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity at start_step (X)."})
    final_sparsity: float = field(default=0.5, metadata={"help": "Sparsity reached at end_step (Y)."})
    schedule: str = field(default="cubic", metadata={"help": f"One of {SCHEDULES}."})
    start_step: int = field(default=0, metadata={"help": "Optimizer step of the first pruning event."})
    end_step: int | None = field(default=None, metadata={"help": "Optimizer step where final_sparsity is reached."})
    pruning_frequency: int | None = field(default=None, metadata={"help": "Optimizer steps between events."})
    scheme: str = field(default="class-blind", metadata={"help": f"One of {SCHEMES}."})
    criterion: str = field(default="magnitude", metadata={"help": f"One of {tuple(CRITERIA)}."})
    fisher_steps: int = field(default=100, metadata={"help": "criterion='obd' / 'wanda': optimizer steps of "
                                                             "squared gradients / layer inputs averaged before each "
                                                             "pruning event."})
    class_granularity: str = field(default="role", metadata={"help": f"One of {CLASS_GRANULARITIES}."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to prune."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never pruned."})
    prune_head: bool = field(default=False, metadata={"help": "Also prune Linear layers outside the blocks."})
    structure: str | list[str] = field(default="unstructured", metadata={
        "help": f"What is pruned together: one of {STRUCTURES}, or a list of 'neurons' and 'heads'."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Model the run started from."})

    #: Fields that may hold a list: a tuple given for one, at construction or set later, is stored as a list (what
    #: JSON gives back), so a config compares equal to its saved copy.
    list_fields = ("target_modules", "exclude_modules", "structure")
    #: The callback that trains under this config, named when a config is passed in `Trainer(callbacks=[...])`.
    callback_name: ClassVar[str] = "MagnitudePruningCallback"

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the config lacks: a Trainer given the config as a callback asks for its events.
        raise missing_attribute(self, name, f"`{self.callback_name}(config)`")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.list_fields and isinstance(value, tuple):
            value = list(value)
        if name == "structure":
            value = canonical_structure(value)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks every field; raises `ValueError` naming the field, the value and what it accepts."""
        for name in ("initial_sparsity", "final_sparsity"):
            check_fraction(name, getattr(self, name))
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(
                f"`final_sparsity` ({self.final_sparsity}) must be >= `initial_sparsity` ({self.initial_sparsity})."
            )
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("criterion", self.criterion, tuple(CRITERIA))
        check_int("fisher_steps", self.fisher_steps, 1)
        check_choice("class_granularity", self.class_granularity, CLASS_GRANULARITIES)
        check_int("start_step", self.start_step, 0)
        check_int("end_step", self.end_step, 0, optional=True)
        check_int("pruning_frequency", self.pruning_frequency, 1, optional=True)
        if self.schedule == "oneshot":
            self._check_oneshot_fields()
        elif self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"`end_step` ({self.end_step}) must be greater than `start_step` ({self.start_step}).")
        _check_patterns("target_modules", self.target_modules)
        _check_patterns("exclude_modules", self.exclude_modules)
        check_bool("prune_head", self.prune_head)
        structures = [self.structure] if isinstance(self.structure, str) else self.structure
        kinds = STRUCTURES[1:]
        if not isinstance(structures, list) or not structures or any(s not in STRUCTURES for s in structures) \
                or len(set(structures)) != len(structures) or ("unstructured" in structures and len(structures) > 1):
            raise ValueError(f"`structure` must be one of {', '.join(map(repr, STRUCTURES))} or a list of "
                             f"{' and '.join(map(repr, kinds))}; got {self.structure!r}.")
        if self.structures():
            if self.scheme not in STRUCTURED_SCHEMES:
                raise ValueError(f"`scheme` must be one of {', '.join(map(repr, STRUCTURED_SCHEMES))} with `structure` "
                                 f"{self.structure!r} ('class-distribution' scores single weights: unstructured "
                                 f"only); got {self.scheme!r}.")
            if self.target_modules is not None:
                raise ValueError(f"`target_modules` must be None with `structure` {self.structure!r}: the structure "
                                 f"decides the targets (use `exclude_modules` to leave blocks out); got "
                                 f"{self.target_modules!r}.")
            if self.prune_head:
                raise ValueError(f"`prune_head` must be False with `structure` {self.structure!r}: the structure "
                                 "prunes neurons / heads inside the Transformer blocks only; got True.")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"`base_model_name_or_path` must be None or a string; got "
                             f"{self.base_model_name_or_path!r}.")

    def _check_oneshot_fields(self) -> None:
        """`schedule="oneshot"` prunes once, to `final_sparsity` at `start_step`: the fields of a gradual schedule
        would be silently ignored, so setting them is an error. Methods that give them a meaning override this."""
        for name in ("end_step", "pruning_frequency"):
            if getattr(self, name) is not None:
                raise ValueError(f"`{name}` must be None with schedule='oneshot' (it prunes once, to final_sparsity "
                                 f"at start_step); got {getattr(self, name)!r}. Use schedule='cubic' or 'iterative' "
                                 "for a gradual schedule.")
        if self.initial_sparsity != 0.0:
            raise ValueError(f"`initial_sparsity` must be 0.0 with schedule='oneshot' (it prunes once, to "
                             f"final_sparsity at start_step); got {self.initial_sparsity!r}.")

    def structures(self) -> tuple[str, ...]:
        """The structure kinds pruned (`"neurons"`, `"heads"`); empty for unstructured pruning."""
        structures = (self.structure,) if isinstance(self.structure, str) else tuple(self.structure)
        return tuple(s for s in structures if s != "unstructured")

    def prepare_loaded_model(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        """Called by `PrunedModel.from_pretrained` with the loaded model and its masks, before they are wrapped:
        a method whose pruning changes more than the weights (Han et al.'s dropout adjustment) restores it here.
        Nothing to do for plain pruning."""

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict, with a `config_type` tag for the right class on load."""
        return {"config_type": type(self).__name__, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """Builds a config from `to_dict()` output, of the class its `config_type` names (which must be `cls` or a
        subclass of it); keys from a newer hf_prune are dropped with a warning."""
        data = dict(data)
        config_type = data.pop("config_type", cls.__name__)
        target_cls = _config_class(config_type)
        if not issubclass(target_cls, cls):
            raise ValueError(f"The config is a {config_type} (`config_type`), not a {cls.__name__}: load it with "
                             f"{config_type}.from_pretrained or PruningConfig.from_pretrained.")
        known = {f.name for f in dataclasses.fields(target_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown %s fields (written by another hf_prune version?): %s",
                           target_cls.__name__, ", ".join(unknown))
        return target_cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> None:
        """Writes `pruning_config.json` into `save_directory` (atomically); `extra` keys are stored beside."""
        os.makedirs(save_directory, exist_ok=True)
        payload = {**self.to_dict(), "hf_prune_version": __version__, **extra}
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(payload, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, **hub_kwargs: Any) -> PruningConfig:
        """Loads `pruning_config.json` from a folder or a Hub repo id (`revision`, `token`, ... are forwarded); from
        a Trainer checkpoint, which has none, the config its `pruning_masks.safetensors` records (the pruning
        callback writes it there).

        Raises:
            FileNotFoundError: when the folder or repo has neither.
        """
        path = resolve_file(pretrained_path, CONFIG_NAME, required=False, **hub_kwargs)
        if path is None:
            recorded = checkpoint_config(pretrained_path, hub_kwargs)
            if recorded is None:
                try:
                    resolve_file(pretrained_path, CONFIG_NAME, **hub_kwargs)  # raises, saying why it is not there
                except FileNotFoundError as err:
                    raise FileNotFoundError(f"{err} {PLAIN_FOLDER_HINT}") from None
            return cls.from_dict(recorded)
        data = read_json_object(path, "the fields of a PruningConfig")
        for key in SAVE_RECORD_KEYS:
            data.pop(key, None)
        return cls.from_dict(data)


#: What a folder without hf_prune's files is, and what loads or prunes it: the one hint of every loader's error.
PLAIN_FOLDER_HINT = (
    f"It is neither a PrunedModel.save_pretrained folder nor a Trainer checkpoint of a pruning callback (whose "
    f"{MASKS_NAME} records the config): a plain transformers model. One pruned elsewhere loads with "
    "PrunedModel.from_pretrained(..., masks_from_zeros=True), its masks then its zero weights; one with nothing "
    "pruned, such as one saved from shrink() (its pruned neurons and heads removed), with AutoModel*.from_pretrained; "
    "MagnitudePruningCallback(PruningConfig(...)) prunes a plain model from scratch.")


def checkpoint_config(path: str | os.PathLike, hub_kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `PruningConfig.to_dict()` that the masks file of a Trainer checkpoint records, or None where the folder
    or repo has no masks file recording one."""
    masks_file = resolve_file(path, MASKS_NAME, required=False, **hub_kwargs)
    recorded = read_masks_metadata(masks_file).get("pruning_config") if masks_file is not None else None
    return recorded if isinstance(recorded, dict) else None


def canonical_structure(value: Any) -> Any:
    """One spelling per `structure`: a single kind as its string (`["neurons"]` -> `"neurons"`), two in
    `STRUCTURES` order (`["heads", "neurons"]` -> `["neurons", "heads"]`), so that configs that prune alike compare
    equal (a resume checks it); anything else as it is, for `validate` to name."""
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) and s in STRUCTURES for s in value) \
            and len(set(value)) == len(value):
        ordered = sorted(value, key=STRUCTURES.index)
        return ordered[0] if len(ordered) == 1 else ordered
    return value


def _config_class(name: str) -> type[PruningConfig]:
    classes = {c.__name__: c for c in (PruningConfig, *all_subclasses(PruningConfig))}
    if not isinstance(name, str) or name not in classes:
        raise ValueError(f"Unknown `config_type` {name!r} in pruning config; accepted: {', '.join(sorted(classes))}.")
    return classes[name]


def all_subclasses(cls: type) -> list[type]:
    """Every class derived from `cls`, directly or not (those defined so far)."""
    return [sub for direct in cls.__subclasses__() for sub in (direct, *all_subclasses(direct))]
