"""Read the tensors of a pickled checkpoint (a Lightning `.ckpt`, a LlamaGen `.pt`) without running code from it and
without the packages its other objects come from.

`torch.load(weights_only=True)` first: it rebuilds tensors and plain containers only. A Lightning file also holds
callbacks, hyper-parameters (OmegaConf) and the like, which weights_only refuses. Then an unpickler whose
`find_class` hands back the real class only for torch's tensor-rebuilding functions and plain containers, and an inert
placeholder for every other global: a reduce on it builds a placeholder, never calls the named function, so a
pickle that would run `os.system` runs nothing. The tensors come out whole; the placeholders are dropped by the caller.
"""

from __future__ import annotations

import collections
import pickle
import types
from pathlib import Path

import torch

from vqgen.cli import VqgenError

ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
ALLOWED.update({("torch", dtype): getattr(torch, dtype) for dtype in ("float32", "float16", "bfloat16", "int64")})


class Inert:
    """What a non-tensor object of the checkpoint becomes: it takes any arguments and state and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return Inert()


class InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):  # legacy typed storages (torch's own loader maps them)
            return super().find_class(module, name)
        return type(f"Inert_{name}", (Inert,), {"__module__": "vqgen.inert"})


INERT_PICKLE = types.SimpleNamespace(Unpickler=InertUnpickler, load=pickle.load, __name__="inert_pickle")


def load_tensors(path: Path) -> dict:
    """The checkpoint's top-level mapping, with every tensor it holds; code in the pickle is never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # other objects than tensors: read them as inert placeholders below
    except Exception as e:  # noqa: BLE001 - not a torch file at all
        cause = f"{type(e).__name__}: {str(e)[:120]}"
        raise VqgenError(f"{path} is not a torch checkpoint vqgen can read ({cause})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=False, pickle_module=INERT_PICKLE)
    except Exception as e:  # noqa: BLE001
        raise VqgenError(
            f"{path} could not be read safely ({type(e).__name__}: {str(e)[:120]}); re-save its state_dict as "
            "safetensors where the training code is installed: safetensors.torch.save_file(sd, 'weights.safetensors')"
        ) from None
    if not isinstance(data, dict):
        raise VqgenError(f"{path} holds a {type(data).__name__}, not a checkpoint dictionary")
    return data


def tensors_only(state) -> dict[str, torch.Tensor]:
    """A state dict's tensors (the placeholders of a partly inert load dropped)."""
    if not isinstance(state, dict):
        raise VqgenError(f"expected a state dict, found a {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
