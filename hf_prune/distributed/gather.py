"""An unsharded copy of a sharded model (FSDP1, FSDP2, DeepSpeed ZeRO-3), for saving a pruned model."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..adapters import without_peft_wrapper
from ..loading import load_dense
from .layouts import is_zero3


def gather_unsharded(model: nn.Module, is_main_process: bool) -> nn.Module:
    """An unsharded copy of an FSDP (1 or 2) or ZeRO-3 model: full weights on CPU on the main process, on the meta
    device elsewhere.

    Collective. FSDP: the full state dict is gathered as accelerate does (`get_model_state_dict` with
    `full_state_dict=True, cpu_offload=True`: only the main process receives the tensors; on CPU all do).
    ZeRO-3: one parameter at a time is gathered (`deepspeed.zero.GatheredParameters`) and copied to CPU on the main
    process. The copy gets the model's generation config; a saved tensor that does not load is an error.

    Raises:
        ValueError: for a peft model (on every process, before any collective): gathering it into a plain model
            would drop its adapters; save the adapters with the Trainer, or train without sharding.
    """
    from torch.distributed.fsdp import FSDPModule

    module = extract_model_from_parallel(model)  # FSDP1 wraps the model; FSDP2 and ZeRO-3 do not
    if without_peft_wrapper(module) is not module:
        raise ValueError(f"A sharded {type(module).__name__} cannot be gathered into a PrunedModel: its adapters "
                         "would be lost. Save the adapters with trainer.save_model(), or train unsharded (DDP) to "
                         "get a PrunedModel and merge_and_unload() it.")
    model_class = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    if any(is_zero3(p) for p in module.parameters()):
        import deepspeed

        saved_names = module.state_dict().keys()  # no gathering: ZeRO-3 parameters are empty placeholders here
        state = {name: buffer for name, buffer in module.named_buffers() if name in saved_names}  # persistent ones
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
        if is_main_process:
            gathered = load_dense(model_class, "the gathered state dict", module.config, {}, state_dict=state)
        else:
            with torch.device("meta"):
                gathered = model_class(module.config)
    if getattr(module, "generation_config", None) is not None:  # from_pretrained made a default one
        gathered.generation_config = copy.deepcopy(module.generation_config)
    return gathered


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
