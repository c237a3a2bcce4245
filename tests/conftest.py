"""Hermetic test setup: no network, a repo-local cache for the converted MNIST, tiny fixtures."""

import os
from pathlib import Path

# Must precede any import of huggingface_hub / datasets / transformers: offline switches are read at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("VQGEN_CACHE", str(ROOT / "runs" / ".cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_digit_like(rng: np.random.Generator, cls: int, size: int = 16) -> np.ndarray:
    """A deterministic, class-dependent blob image (uint8, size x size)."""
    img = np.zeros((size, size), np.float64)
    yy, xx = np.mgrid[:size, :size]
    cx, cy = size * (0.3 + 0.4 * (cls % 2)), size * (0.3 + 0.4 * ((cls // 2) % 2))
    img += 255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size / 6) ** 2))
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """imagefolder layout: {train,test}/{a,b}/*.png, 16x16 grayscale, 24 train + 8 test images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls, name in enumerate(("a", "b")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(make_digit_like(rng, cls)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny_config():
    from stage1_vqvae.model import VQVAEConfig

    return VQVAEConfig(
        in_channels=1,
        image_size=16,
        hidden_channels=32,
        res_channels=16,
        num_res_blocks=1,
        downsample=4,
        codebook_size=16,
        codebook_dim=8,
    )


@pytest.fixture
def tiny_model(tiny_config):
    from stage1_vqvae.model import VQVAE

    torch.manual_seed(0)
    return VQVAE(tiny_config)


class FakeHubApi:
    """Stands in for the Hub endpoint (HfApi): create_repo + upload_folder copy into `remote/{type}/{repo_id}`.

    The real upload code path runs; only the network boundary is replaced.
    """

    remote: Path = Path("remote")

    def __init__(self, *args, **kwargs):
        self.created = []

    def create_repo(self, repo_id, repo_type=None, **kwargs):
        from types import SimpleNamespace

        self.created.append((repo_id, repo_type or "model"))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, repo_id, repo_type=None, **kwargs):
        import shutil

        shutil.copytree(folder_path, self.remote / (repo_type or "model") / repo_id, dirs_exist_ok=True)
        return f"https://hub.local/{repo_id}/commit/0"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The FakeHubApi class, uploading under tmp_path/remote and patched in wherever vqgen or the mixin use HfApi."""
    import huggingface_hub.hub_mixin

    import stage1_vqvae.hub as hub

    api = type("FakeHub", (FakeHubApi,), {"remote": tmp_path / "remote"})
    monkeypatch.setattr(hub, "HfApi", api)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", api)
    return api
