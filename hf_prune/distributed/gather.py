"""An unsharded copy of a sharded model (FSDP1, FSDP2, DeepSpeed ZeRO-3), for saving a pruned model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .layouts import is_zero3


def gather_unsharded(model: nn.Module, is_main_process: bool) -> nn.Module:
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
    if any(is_zero3(p) for p in module.parameters()):
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
