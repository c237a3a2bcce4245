"""The vqgan network's cost: a training forward+backward of vqgen's VQVAE(arch=vqgan) next to diffusers' own
VQModel at the same weights and sizes, in the same run (`make bench` calls `bench`; alone:

    python -m benchmarks.vqgan [--repeats 5] [--sizes 64,256]

64 px: experiments/networks.py's f4 network (ch 32 x 1,2,4, two residual blocks, attention at the 16x16 grid),
batch 8. 256 px: configs/imagenet256-f16's network (ch 128 x 1,1,2,2,4, attention at 16 px), batch 2. vqgen's step
is its training loss (MSE + the quantizer's terms, EMA update) backward; diffusers' is MSE of `VQModel(x).sample`
+ its `commit_loss`, backward. Time per image: the median of interleaved repeats. Peak memory of a step after a
warm-up one, above what is allocated before it: on a GPU `max_memory_allocated`; on a CPU the peak RSS (VmHWM, reset
before the step) over the resting RSS, each network alone in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    64: dict(batch=8, config=dict(block_out_channels=[32, 64, 128], latent_channels=64, downsample=4, codebook_size=512,
                                  codebook_dim=64)),
    256: dict(batch=2, config=dict(block_out_channels=[128, 128, 256, 256, 512], latent_channels=256, downsample=16,
                                   attn_resolutions=[16], codebook_size=16384, codebook_dim=8, l2_normalize=True,
                                   decay=None)),
}  # fmt: skip


def build(size: int, device: torch.device):
    """vqgen's vqgan VQVAE and diffusers' VQModel holding the same weights, and a batch of images."""
    from diffusers import VQModel

    from stage1_vqvae.export_diffusers import vqmodel_state
    from stage1_vqvae.model import VQVAE, VQVAEConfig
    from stage1_vqvae.vqgan import vqmodel_config

    torch.manual_seed(0)
    spec = SIZES[size]
    cfg = VQVAEConfig(in_channels=3, image_size=size, arch="vqgan", layers_per_block=2, **spec["config"])
    ours = VQVAE(cfg).to(device).train()
    theirs = VQModel(**vqmodel_config(cfg, cfg.codebook_dim)).to(device).train()
    theirs.load_state_dict(vqmodel_state(ours))
    x = torch.rand(spec["batch"], 3, size, size, device=device) * 2 - 1
    return ours, theirs, x


def steps(ours, theirs, x) -> dict:
    def vqgen_step():
        ours(x).loss.backward()
        ours.zero_grad(set_to_none=True)

    def diffusers_step():
        out = theirs(x)
        (F.mse_loss(out.sample, x) + out.commit_loss.mean()).backward()
        theirs.zero_grad(set_to_none=True)

    return {"vqgen": vqgen_step, "diffusers": diffusers_step}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def cpu_step_peak(size: int, which: str) -> float:
    """(In a fresh process.) MiB above the resting RSS at the peak of one step of `which`, after a warm-up step:
    only the measured network is built, and the kernel's peak (VmHWM) is reset before the step (clear_refs 5)."""
    from diffusers import VQModel

    from stage1_vqvae.model import VQVAE, VQVAEConfig
    from stage1_vqvae.vqgan import vqmodel_config

    spec = SIZES[size]
    cfg = VQVAEConfig(in_channels=3, image_size=size, arch="vqgan", layers_per_block=2, **spec["config"])
    ours = VQVAE(cfg).train() if which == "vqgen" else None
    theirs = VQModel(**vqmodel_config(cfg, cfg.codebook_dim)).train() if which == "diffusers" else None
    x = torch.rand(spec["batch"], 3, size, size) * 2 - 1
    step = steps(ours, theirs, x)[which]
    step()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()
    return (_status_kib("VmHWM") - base) / 1024


def peak_memory(size: int, which: str) -> float:
    """MiB one step of `which` adds to the peak over the built model (a fresh process on a CPU)."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        fns = steps(*build(size, device))
        fns[which]()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fns[which]()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    code = f"from benchmarks.vqgan import cpu_step_peak; print(cpu_step_peak({size}, {which!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def bench(repeats: int, row, sizes=(64, 256)) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for size in sizes:
        ours, theirs, x = build(size, device)
        fns = steps(ours, theirs, x)
        for fn in fns.values():  # warm-up (allocator, kernels)
            fn()
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t0)
        per_image = {k: statistics.median(v) / len(x) for k, v in times.items()}
        mem = {k: peak_memory(size, k) for k in fns}
        params = sum(p.numel() for p in ours.parameters()) / 1e6
        row(
            f"vqgan network training step, {size} px (f{ours.config.downsample}, {params:.1f} M parameters), "
            f"batch {len(x)}, {device.type}",
            f"{per_image['vqgen'] * 1e3:.0f} ms/img, peak +{mem['vqgen']:.0f} MiB",
            "~ diffusers' VQModel",
            f"diffusers VQModel forward+backward: {per_image['diffusers'] * 1e3:.0f} ms/img, peak +"
            f"{mem['diffusers']:.0f} MiB (time ratio {per_image['vqgen'] / per_image['diffusers']:.2f})",
        )
        del ours, theirs, x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="64,256")
    args = parser.parse_args(argv)
    print("| what | figure | target | detail |\n|---|---|---|---|")
    bench(args.repeats, lambda *cells: print("| " + " | ".join(cells) + " |", flush=True),
          tuple(int(s) for s in args.sizes.split(",")))  # fmt: skip
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
