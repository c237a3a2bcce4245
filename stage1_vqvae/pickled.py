"""Read the tensors of a pickled checkpoint (a Lightning `.ckpt`, a LlamaGen `.pt`) without running code from it and
without the packages its other objects come from.

`torch.load(weights_only=True)` first: it rebuilds tensors and plain containers only. A Lightning file also holds
callbacks, hyper-parameters (OmegaConf) and the like, which weights_only refuses. Then an unpickler whose
`find_class` hands back the real class only for torch's tensor-rebuilding functions and plain containers, and an inert
placeholder for every other class (a Lightning callback, an OmegaConf config, an argparse Namespace). A global that
loading would *call* (a function, or anything from os, subprocess, builtins and the like) stops the load at once with
one line, before anything is called: a pickle that would run `os.system` runs nothing and is refused. Functions that
only rebuild data (numpy arrays and scalars) are read as placeholders. The tensors come out whole; the placeholders
are dropped by the caller.
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


# Functions that only rebuild data (numpy arrays and scalars, old-protocol objects): read as placeholders too.
DATA_FUNCTIONS = {
    ("_codecs", "encode"), ("copyreg", "_reconstructor"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
}  # fmt: skip
# Modules whose globals in a pickle mean running something (a shell, a file, an import, code from a string).
CODE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "importlib", "shutil", "socket", "runpy",
                "code", "ctypes", "pickle", "marshal", "pty", "types", "io", "tempfile", "webbrowser",
                "functools"}  # fmt: skip


class RunsCode(pickle.UnpicklingError):
    """The pickle names a function that loading would call: refused before anything is called."""


class InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):  # legacy typed storages (torch's own loader maps them)
            return super().find_class(module, name)
        function_like = name[:1].islower() and (module, name) not in DATA_FUNCTIONS
        if module.split(".")[0] in CODE_MODULES or function_like:
            raise RunsCode(f"{module}.{name}")
        return type(f"Inert_{name}", (Inert,), {"__module__": "vqgen.inert"})  # a class: an object to ignore


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
    except RunsCode as e:
        raise VqgenError(
            f"{path}: its pickle would call {e} when loaded. vqgen ran nothing and refuses the file; re-save its "
            "state_dict as safetensors where it was made: safetensors.torch.save_file(sd, 'weights.safetensors')"
        ) from None
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
