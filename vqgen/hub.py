"""Hub helpers shared by both stages: folder-or-repo resolution, safe loading, fingerprints, uploads.

Everything loads from safetensors and JSON only: no pickle, no remote code. Uploads go through an
injectable `HfApi`, so tests run the real code path against a fake endpoint offline.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors.torch import load_file, load_model

from vqgen.cli import VqgenError

PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "checkpoint.pt")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str) -> bool:
    return bool(REPO_ID_RE.match(name)) and not name.startswith((".", "/"))


def hub_id(location: str | None) -> str | None:
    """`location` if it names a Hub repo (owner/name, not an existing local path), else None: what a card may
    show (a local path means nothing on the Hub and leaks a user's file system)."""
    return location if location and looks_like_repo_id(location) and not Path(location).exists() else None


def resolve_folder(name_or_path: str | os.PathLike, what: str, repo_type: str = "model", **hub_kwargs) -> Path:
    """A local folder as is, or a Hub repo id downloaded to the cache; one clear error otherwise."""
    p = Path(name_or_path)
    if p.exists():
        if not p.is_dir():
            raise VqgenError(f"{what} {p} is a file; pass the folder that holds it ({p.parent})")
        return p
    name = str(name_or_path)
    if not looks_like_repo_id(name):
        raise VqgenError(f"{what} {name}: no such folder, and it is not a Hub repo id (owner/name)")
    try:
        return Path(snapshot_download(name, repo_type=repo_type, **hub_kwargs))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise VqgenError(
            f"{what} {name}: not a local folder, and the Hub could not be reached or has no such "
            f"{repo_type} repo ({type(e).__name__}). Pass a local folder, or check the id and your network"
        ) from None


def load_safetensors_model(model: torch.nn.Module, model_id: str, *, map_location: str = "cpu", **hub_kwargs):
    """Load `model.safetensors` strictly into `model`; refuse pickle checkpoints outright."""
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    folder = resolve_folder(model_id, "model", allow_patterns=["*.json", "*.safetensors", "*.md"], **hub_kwargs)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickles:
            raise VqgenError(
                f"{folder} holds only a pickle checkpoint ({pickles[0]}); vqgen never unpickles model files "
                "because that can run arbitrary code. Convert it to model.safetensors with a trusted script"
            )
        raise VqgenError(f"{folder} has no model.safetensors; is this a vqgen model folder?")
    try:  # strict: a missing, unexpected or misshapen tensor is an error, never a silent partial load
        load_model(model, str(weights), strict=True, device=str(map_location))
    except RuntimeError as e:
        raise VqgenError(f"{weights} does not match the model built from its config.json: {str(e)[:300]}") from None
    model.eval()
    return model


def read_state_dict(path: Path, what: str) -> dict:
    """A state dict from .pth (tensors only: no code runs) or .safetensors; one error for a foreign file."""
    try:
        return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises many types
        raise VqgenError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e)[:150]})") from None


def state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes), independent of memory layout."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().to("cpu").clone(memory_format=torch.contiguous_format).reshape(-1)  # row-major bytes
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with vqgen",
    api: HfApi | None = None,
    local_copy: Path | str | None = None,
) -> str:
    """Create the repo if needed and upload `folder`; returns the commit URL. The token is never logged.

    `local_copy`: the folder the user keeps when `folder` is a temporary one (its message names what still
    exists after the failure); None when `folder` itself stays."""
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, commit_message=commit_message
        )
    except Exception as e:  # offline mode, HTTP errors, connection errors of any transport: one clear line
        cause = f"{type(e).__name__}: {str(e)[:120]}"
        keep = folder if local_copy is None else local_copy
        if keep == "":  # an object pushed from memory: nothing on disk to retry with
            fix = f"save it with save_pretrained(FOLDER), then run: hf upload {repo_id} FOLDER --repo-type {repo_type}"
        else:
            fix = (
                f"the local copy in {keep} is complete; retry with: hf upload {repo_id} {keep} --repo-type {repo_type}"
            )
        raise VqgenError(
            f"could not push to the Hub {repo_type} repo {repo_id} ({cause}). Check your network and token; {fix}"
        ) from None
    return str(getattr(info, "commit_url", info))


# The figures a card's model-index carries (the Hub's results widget and leaderboards read them), by the key a
# metrics dict uses: (metric type, display name).
CARD_METRICS = {
    "psnr": ("psnr", "PSNR (dB)"), "ssim": ("ssim", "SSIM"), "usage": ("codebook_usage", "codebook usage"),
    "bits_per_dim": ("bits_per_dim", "bits/dim"), "rfid": ("rfid", "rFID"), "lpips": ("lpips", "LPIPS"),
    "fid": ("fid", "FID"), "kid": ("kid", "KID"), "inception_score": ("inception_score", "Inception Score"),
    "precision": ("precision", "precision (k=3)"), "recall": ("recall", "recall (k=3)"),
}  # fmt: skip


def dataset_label(source: str) -> str:
    """How a card names a data source: the built-in MNIST as `mnist`, a Hub dataset by its id, a local folder by its
    name (a local path means nothing on the Hub, and may reveal a user's file system)."""
    return "mnist" if source == "mnist" else (hub_id(source) or Path(source).name)


def add_eval_results(readme: Path, model_name: str, task: str, dataset: str, split: str, metrics: dict) -> None:
    """Write `metrics` (the CARD_METRICS among them) into the card's model-index for (task, dataset, split),
    replacing earlier results for the same dataset and split and keeping the others."""
    from huggingface_hub import EvalResult, ModelCard

    card = ModelCard.load(readme)
    kept = [r for r in card.data.eval_results or [] if (r.dataset_name, r.dataset_split) != (dataset, split)]
    new = [
        EvalResult(
            task_type=task,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type=kind,
            metric_name=name,
            metric_value=round(float(metrics[key]), 6),
        )  # fmt: skip
        for key, (kind, name) in CARD_METRICS.items()
        if isinstance(metrics.get(key), (int, float))
    ]
    if not new:
        return
    card.data.model_name = card.data.model_name or model_name
    card.data.eval_results = kept + new
    card.save(readme)
