"""Hermetic test setup: no network, a repo-local cache for the converted MNIST, tiny fixtures."""

import os
import sys
from pathlib import Path

# Must precede any import of huggingface_hub / datasets / transformers: offline switches are read at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = Path(__file__).resolve().parent.parent
# The test modules import `helpers` from this folder (importlib mode puts nothing on sys.path by itself); appended,
# so that tests/vqgen/ never shadows the vqgen package.
sys.path.append(str(Path(__file__).resolve().parent))
os.environ.setdefault("VQGEN_CACHE", str(ROOT / "runs" / ".cache"))
# The torch hub cache is where the metric weights are looked up: an empty one keeps the tests hermetic (a machine
# with Inception weights would otherwise score every tiny model); tests that want weights make their own.
os.environ["TORCH_HOME"] = str(ROOT / "runs" / ".cache" / "torch-empty")

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
    """imagefolder layout: {train,test,validation}/{a,b}/*.png, 16x16 grayscale, 24 train, 8 test and 3
    validation images (an odd count, which 2 ranks pad). Carving is tested on sources made for it: a hash carve
    of 24 images gives a handful of rows, or none."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, counts in (("train", (12, 12)), ("test", (4, 4)), ("validation", (2, 1))):
        for cls, (name, n) in enumerate(zip(("a", "b"), counts)):
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
    """Stands in for the Hub endpoint (HfApi): repos are folders under `remote/{type}/{repo_id}`.

    The real upload code paths run (ours, the mixin's, and `DatasetDict.push_to_hub`'s preupload + commit);
    only the network boundary is replaced.
    """

    remote: Path = Path("remote")

    def __init__(self, *args, **kwargs):
        self.created = []

    def _repo(self, repo_id, repo_type) -> Path:
        return self.remote / (repo_type or "model") / repo_id

    def create_repo(self, repo_id, repo_type=None, **kwargs):
        from types import SimpleNamespace

        self.created.append((repo_id, repo_type or "model"))
        self._repo(repo_id, repo_type).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id, url=f"https://hub.local/{repo_id}")

    def repo_info(self, repo_id, repo_type=None, **kwargs):
        from types import SimpleNamespace

        from huggingface_hub.errors import RepositoryNotFoundError

        if not self._repo(repo_id, repo_type).is_dir():
            raise RepositoryNotFoundError(f"{repo_id} not found", response=None)
        return SimpleNamespace(id=repo_id, sha="0" * 40)

    def upload_folder(self, *, folder_path, repo_id, repo_type=None, **kwargs):
        import shutil

        shutil.copytree(folder_path, self._repo(repo_id, repo_type), dirs_exist_ok=True)
        return f"https://hub.local/{repo_id}/commit/0"

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        for op in additions:  # the caller deletes its temp file after this: keep the bytes
            op.fake_bytes = Path(op.path_or_fileobj).read_bytes()

    def create_commit(self, repo_id, operations, repo_type=None, **kwargs):
        from types import SimpleNamespace

        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        repo = self._repo(repo_id, repo_type)
        for op in operations:
            target = repo / op.path_in_repo
            if isinstance(op, CommitOperationAdd):
                data = getattr(op, "fake_bytes", None)
                if data is None:
                    src = op.path_or_fileobj
                    data = src if isinstance(src, bytes) else Path(src).read_bytes()
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            elif isinstance(op, CommitOperationDelete) and target.exists():
                target.unlink()
        return SimpleNamespace(commit_url=f"https://hub.local/{repo_id}/commit/1", oid="1" * 40)


def fake_hf_file_system(remote: Path):
    """An fsspec filesystem reading `datasets/{repo}@{rev}/path` from the fake Hub's folders."""
    import fsspec

    class FakeHfFileSystem(fsspec.AbstractFileSystem):
        def __init__(self, *args, **kwargs):
            super().__init__()

        @staticmethod
        def _split(path: str) -> tuple[str, Path]:
            kind, rest = path.split("/", 1)
            repo, _, tail = rest.partition("@")
            prefix = path[: len(path) - len(tail.partition("/")[2])].rstrip("/")
            return prefix, remote / {"datasets": "dataset", "models": "model"}[kind] / repo / tail.partition("/")[2]

        def _open(self, path, mode="rb", **kwargs):
            _, local = self._split(path)
            if not local.is_file():
                raise FileNotFoundError(path)
            return open(local, mode)

        def glob(self, path, **kwargs):
            prefix, local = self._split(path)
            root = remote / local.relative_to(remote).parts[0] / "/".join(local.relative_to(remote).parts[1:3])
            pattern = str(local.relative_to(root))
            return [f"{prefix}/{p.relative_to(root)}" for p in sorted(root.glob(pattern))] if root.is_dir() else []

    return FakeHfFileSystem


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The FakeHubApi class, uploading under tmp_path/remote and patched in wherever vqgen, the mixin or
    datasets' push_to_hub reach the Hub."""
    import datasets.arrow_dataset
    import datasets.dataset_dict
    import huggingface_hub.hub_mixin

    import vqgen.hub as hub

    api = type("FakeHub", (FakeHubApi,), {"remote": tmp_path / "remote"})
    for module in (hub, huggingface_hub.hub_mixin, datasets.dataset_dict, datasets.arrow_dataset):
        monkeypatch.setattr(module, "HfApi", api)
    monkeypatch.setattr(datasets.dataset_dict, "HfFileSystem", fake_hf_file_system(tmp_path / "remote"))
    return api


@pytest.fixture(scope="session")
def stage1(tmp_path_factory, image_folder):
    """A tiny trained VQ-VAE folder (with data_config.json) and its extracted codes (stage 2's tests share it)."""
    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.extract import extract
    from stage1_vqvae.train import main as train1

    from helpers import TINY1

    root = tmp_path_factory.mktemp("pipe")
    model_dir = train1(
        [
            "--config",
            TINY1,
            f"train.output_dir={root / 's1'}",
            f"data.source={image_folder}",
            "data.max_samples=null",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.eval_every=0",
            "train.checkpoint_every=0",
        ]
    )
    from stage1_vqvae.model import VQVAE

    codes = extract(
        VQVAE.from_pretrained(model_dir),
        DataConfig(source=str(image_folder), resolution=16, resize_mode="stretch"),
        root / "codes",
        model_location=str(model_dir),
    )
    return root, model_dir, codes


@pytest.fixture(scope="session")
def pipeline_dir(stage1, tmp_path_factory) -> Path:
    """A pipeline folder of the tiny VQ-VAE and a 2-step prior over its codes (the app's and the sample
    metrics' tests share it)."""
    from stage1_vqvae.model import VQVAE
    from stage2_prior.model import load_prior
    from stage2_prior.pipeline import VQGenPipeline

    from helpers import train2

    _, vqvae_dir, codes = stage1
    root = tmp_path_factory.mktemp("tiny-pipeline")
    prior = train2(root / "s2", codes, "train.max_steps=2", "train.checkpoint_every=0")
    return VQGenPipeline(VQVAE.from_pretrained(vqvae_dir), load_prior(prior)).save_pretrained(root / "pipeline")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random Inception-V3 in torch-fidelity's file format (its tensor names, .pth), so the equality tests run
    offline. He-initialised convs; batch-norm statistics calibrated on 24 structured images (as a trained network's
    are on its data), so the features vary from image to image as real Inception features do (FID ~100, KID ~0.1
    between two image sets) rather than collapsing to a constant."""
    from benchmarks.common import random_inception

    with torch.random.fork_rng():
        net = random_inception(seed=0)
        torch.manual_seed(0)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # a cumulative average over the calibration batch
                m.reset_running_stats()
        rng = np.random.default_rng(0)
        calibration = np.stack([make_digit_like(rng, c % 4, 32) for c in range(24)])  # (24, 32, 32)
        x = torch.from_numpy(calibration).to(torch.uint8)[:, None].expand(-1, 3, -1, -1)  # (24, 3, 32, 32)
        with torch.no_grad():
            net.train()(x)  # torch-fidelity's own resize and scaling, then batch statistics
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def vgg16_file(tmp_path_factory):
    """A random VGG16 weights file as torchvision saves it (features.* at full width, and a classifier tensor),
    He-initialised so that features stay of unit scale through the 13 convs: (path, state)."""
    from helpers import VGG16_CONVS, VGG16_WIDTHS

    g = torch.Generator().manual_seed(0)
    state, prev = {}, 3
    for i, w in zip(VGG16_CONVS, VGG16_WIDTHS):
        state[f"features.{i}.weight"] = torch.randn(w, prev, 3, 3, generator=g) * (2 / (9 * prev)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(w, generator=g) * 0.1
        prev = w
    state["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path_factory.mktemp("vgg16") / "vgg16-random.pth"
    torch.save(state, path)
    return path, state
