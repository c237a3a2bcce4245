"""Helpers shared by the test modules (plain functions; pytest puts this folder on sys.path)."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stage1_vqvae.data import (
    DataConfig,
    load_splits,
)
from stage2_prior.model import (
    PriorConfig,
    TokenLayout,
    build_prior,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY1 = os.path.join(ROOT, "configs", "tiny", "stage1.yaml")
TINY2 = os.path.join(ROOT, "configs", "tiny", "stage2.yaml")


def stage1_args(out, image_folder, *extra) -> list[str]:
    """CLI arguments for a tiny stage-1 run on the test image folder, without evaluation or trackers."""
    return [
        "--config",
        TINY1,
        f"train.output_dir={out}",
        f"data.source={image_folder}",
        "data.max_samples=null",
        "train.batch_size=8",
        "train.eval_every=0",
        "train.report_to=none",
        *extra,
    ]


# torchvision's VGG16 `features` up to LPIPS's last tap: conv indices and widths, pools, the ReLUs LPIPS reads
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_POOLS = (4, 9, 16, 23)
VGG16_TAPS = (3, 8, 15, 22, 29)

# The vqgan network at test size: 3 levels (16, 8, 4 px) of 16-32 channels, attention at the 4x4 code grid.
VQGAN_ARGS = [
    "model.arch=vqgan", "model.block_out_channels=[16,16,32]", "model.norm_num_groups=8", "model.latent_channels=8",
    "model.layers_per_block=1",
]  # fmt: skip


def free_port() -> int:
    """A TCP port nobody listens on now (a fixed port can still be held by an earlier run's socket)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PROBE = os.path.join(ROOT, "tests", "launch_probe")  # its sitecustomize says when a rank leaves its group


def run_two_processes(*module_args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> ...` (or `python <script> ...`) in 2 CPU processes under torchrun (Accelerate on CPU,
    one thread each), on a free port. Fails the test when any rank exits without destroying its process group or
    reaches the interpreter's teardown: the causes of the rare abort at exit (tests/launch_probe)."""
    port = free_port()
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([PROBE, ROOT]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    target = [script] if script else ["-m"]
    proc = subprocess.run([*cmd, *target, *module_args], env=env, capture_output=True, text=True, timeout=300)
    said = probe_says(proc.stderr)
    if said or "destroy_process_group" in proc.stderr:  # (the second: NCCL's own warning)
        pytest.fail(f"a rank ended in a way that can abort it at exit: {said or proc.stderr[-2000:]}")
    return proc


def probe_says(stderr: str) -> list[str]:
    """tests/launch_probe's lines: a rank left its process group alive or reached the interpreter's teardown."""
    return [line for line in stderr.splitlines() if "vqgen-test:" in line]


def sample_metrics_args(pipeline, weights, batch_size: int, kid_subset_size: int, *extra: str) -> list[str]:
    """`evaluate_samples` on a pipeline: 12 samples in chunks of `batch_size`, one real reference draw."""
    return ["--pipeline", str(pipeline), "--num_samples", "12", "--batch_size", str(batch_size), "--kid_subset_size",
            str(kid_subset_size), "--inception_weights", str(weights), "--reference_draws", "1", *extra]  # fmt: skip


def codes_meta(codebook_size=16, height=4, width=4, class_names=("a", "b", "c"), fingerprint="f" * 64, **kw):
    """A CodesMeta for priors built in tests without extracting codes."""
    from vqgen.codes import CodesMeta

    fields = dict(
        codebook_size=codebook_size,
        height=height,
        width=width,
        image_size=16,
        channels=1,
        class_names=list(class_names) if class_names else None,
        splits={"train": 8},
        source="mnist",
        data_config={"source": "mnist", "resolution": 16},
        vqvae_fingerprint=fingerprint,
        vqvae_location=None,
        codes_fingerprint="c" * 64,
    )
    return CodesMeta(**{**fields, **kw})


def resumed_equals_uninterrupted(train, out_a, out_b, args, later_checkpoints, check=None) -> tuple[Path, Path]:
    """Run `train(args)` into out_a and out_b; make out_b look like a run that died after its earliest kept
    checkpoint (later checkpoints and the final model deleted); resume it; assert both final models are equal
    bit for bit. `args(out)` gives the command line for an output folder; `check(out_b)` runs before the resume.
    Returns both final model folders (uninterrupted, resumed)."""

    import torch
    from safetensors.torch import load_file

    full = Path(train(args(out_a)))
    train(args(out_b))
    if check is not None:
        check(Path(out_b))
    for name in later_checkpoints:
        shutil.rmtree(Path(out_b) / "checkpoints" / name)
    shutil.rmtree(Path(out_b) / "model")
    resumed = Path(train([*args(out_b), "--resume_from_checkpoint", "latest"]))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return full, resumed


def make_tar_shards(root, n_shards=3, per_shard=12, corrupt=None, size=20):
    """WebDataset-style shards: {key}.png + {key}.cls in train-XXX.tar; `corrupt` = (shard, row) gets bad bytes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        with tarfile.open(root / f"train-{shard:03d}.tar", "w") as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
                png = b"not a png" if corrupt == (shard, i) else buf.getvalue()
                for ext, data in (("png", png), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"s{shard}_{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def make_id_source(root, n: int, kind: str, n_files: int = 1):
    """A train-only source of n 8x8 images, each with its row id written in its first two pixels."""
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = []
    for i in range(n):
        a = np.zeros((8, 8), np.uint8)
        a[0, 0], a[0, 1] = i % 256, i // 256
        images.append(Image.fromarray(a, mode="L"))
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=feats)
    if kind == "disk":  # streamed as 16 shards
        datasets.DatasetDict({"train": ds}).save_to_disk(str(root))
    else:
        root.mkdir(parents=True)
        for f in range(n_files):
            ds.shard(n_files, f, contiguous=True).to_parquet(str(root / f"train-{f:05d}-of-{n_files:05d}.parquet"))
    return root


def row_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def streamed_epoch(cfg: DataConfig, world: int, workers: int, batch: int = 4) -> set[int]:
    """The row ids every rank x worker trains on in one epoch of the stream."""
    seen = set()
    for rank in range(world):
        train = load_splits(cfg, splits=("train",))["train"].configure(batch, rank, world)
        done = set()
        for b in torch.utils.data.DataLoader(train, batch_size=None, num_workers=workers):
            if b["position"]["epoch"] >= 1:
                done.add(b["position"]["worker"])
                if len(done) == max(1, workers):
                    break
                continue
            seen.update(row_ids(b["images"]))
    return seen


def run_cli_process(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, cwd=ROOT)


def assert_one_error_line(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def train2(out, codes, *extra):
    from stage2_prior.train import main

    return main(["--config", TINY2, f"train.output_dir={out}", f"data.codes={codes}", *extra])


LAYOUT = TokenLayout(codebook_size=16, num_classes=3, height=4, width=4)


def tiny_prior(layout=LAYOUT, arch="gpt2", **meta):
    torch.manual_seed(0)
    names = [f"c{i}" for i in range(layout.num_classes)] or None
    codes = codes_meta(layout.codebook_size, layout.height, layout.width, class_names=names, **meta)
    cfg = PriorConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return build_prior(cfg, layout, codes, "codes").eval()


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def lpips_reference(tmp_path, net: str):
    """The lpips package with a random backbone (nothing downloaded) and its shipped v0.1 linear layers, and the
    same weights as files for vqgen: (lpips.LPIPS, torchvision-format backbone path, linear layers path)."""
    import lpips

    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    backbone = {}
    for name, tensor in ref.net.state_dict().items():  # slice{k}.{index}.weight -> features.{index}.weight
        backbone["features." + name.split(".", 1)[1]] = tensor
    torch.save(backbone, tmp_path / f"{net}-backbone.pth")
    lin = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth")
    return ref, str(tmp_path / f"{net}-backbone.pth"), lin


class RGBImages(torch.utils.data.Dataset):
    """uint8 (3, H, W) tensors as torch-fidelity reads its inputs: gray repeated to RGB, as its PIL convert does."""

    def __init__(self, images: torch.Tensor):
        self.images = images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
