"""FSDP as the launcher asks for it, checked before a step is taken: the two ways it fails quietly or deep.

- Accelerate (1.16) runs FSDP only on accelerators: under an FSDP launcher config on CPUs it comes up as plain
  multi-CPU data parallelism, every parameter on every rank, and says nothing. vqgen refuses that in one line.
  (The gate is Accelerate's policy: the tests lift it and run FSDP2 on gloo through this trainer, docs/cluster.md.)
- With `TRANSFORMER_BASED_WRAP` and no `fsdp_transformer_layer_cls_to_wrap`, Accelerate wraps the classes the model
  names in `_no_split_modules` (GPT2Block for model.arch gpt2, LlamaDecoderLayer for llama), so the shipped config
  follows the architecture by itself. A class the model does not contain (a config written for the other
  architecture, or a stage-1 network, which has no transformer blocks) would surface as a ValueError from deep
  inside `prepare`; vqgen names the classes the model does have, in one line, before it.
"""

from __future__ import annotations

import os

import torch

from vqgen.cli import VqgenError


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp_backend(accelerator) -> None:
    """One line when the launcher asked for FSDP and Accelerate did not give it."""
    from accelerate.utils import DistributedType

    if fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP:
        raise VqgenError(
            f"the launcher asked for FSDP, but Accelerate runs FSDP only on GPUs and other accelerators and this run "
            f"came up as {accelerator.distributed_type.value} on {accelerator.device.type}, where every rank would "
            "hold every parameter; on CPUs launch without the FSDP config (torchrun, see "
            "configs/accelerate/cpu_2proc.md), or run on GPUs",
            every_rank=True,
        )


def wrap_problem(model: torch.nn.Module, names: list[str] | None) -> str | None:
    """Why FSDP's transformer-block wrap cannot wrap `model` with the class `names` (None: the model's own
    `_no_split_modules`), or None when it can."""
    names = list(names) if names else list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    if names and all(n in present for n in names):
        return None
    blocks = sorted(n for n in present if n.endswith(("Block", "Layer")))
    asked = f"wraps {', '.join(names)}" if names else "has no block class to wrap (the model names none)"
    return (
        f"FSDP's transformer-block wrap {asked}, but {type(model).__name__} holds {', '.join(blocks) or 'no blocks'}; "
        "remove fsdp_transformer_layer_cls_to_wrap from the launcher config (the class then follows model.arch) or "
        "use fsdp_auto_wrap_policy NO_WRAP for a model without transformer blocks"
    )


def check_fsdp_wrap(accelerator, model: torch.nn.Module) -> None:
    """Before `prepare`: one line when FSDP's transformer-based wrap would not find its classes in `model`."""
    if not fsdp_requested() or os.environ.get("FSDP_AUTO_WRAP_POLICY", "") != "TRANSFORMER_BASED_WRAP":
        return
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    problem = wrap_problem(model, names.split(",") if isinstance(names, str) else names)
    if problem:
        raise VqgenError(problem, every_rank=True)
