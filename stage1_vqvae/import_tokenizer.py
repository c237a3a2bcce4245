"""Turn a pretrained tokenizer into a vqgen stage-1 folder, so that extraction, the prior, the pipeline, sample.py,
the app and the metrics run on its codes unchanged.

    python -m stage1_vqvae.import_tokenizer amused/amused-256 --subfolder vqvae --output_dir runs/amused/stage1
    python -m stage1_vqvae.import_tokenizer path/to/vqmodel --pixel_range=-1,1 --output_dir runs/mine/stage1
    python -m stage1_vqvae.import_tokenizer vqgan_imagenet_f16_16384/ckpts/last.ckpt \
        --config vqgan_imagenet_f16_16384/configs/model.yaml --pixel_range=-1,1 --output_dir runs/taming16k/stage1
    python -m stage1_vqvae.import_tokenizer vq_ds16_c2i.pt --output_dir runs/llamagen-vq16/stage1

Sources: a diffusers `VQModel` folder or Hub repo (with `--subfolder` where the repo holds a whole pipeline); a
taming-transformers or latent-diffusion VQGAN checkpoint file with `--config` (its YAML; EMA weights taken where
the checkpoint has them, unless `--ema off`); a LlamaGen VQ checkpoint file (VQ-16, VQ-8; its `model` weights, or
`ema` with `--ema on`). Pickled files are read without running code from them (`pickled.py`).
The pixel range a tokenizer was trained on is not in its config: it comes from the table below for known repos,
or from `--pixel_range` (required otherwise); vqgen's [-1, 1] images are mapped to it on the way in and back on
the way out. The folder is frozen: vqgen's stage-1 trainer always starts a network from scratch, so an imported
tokenizer is used as it is. Its card and `tokenizer_source.json` name the source, its revision or the sha256 of
its weights file, and its license as the source's own card states it; the codes extracted with it record this
folder's fingerprint, so the chain reaches back to the source file.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from stage1_vqvae.from_diffusers import import_vqmodel
from stage1_vqvae.from_llamagen import import_llamagen
from stage1_vqvae.from_taming import import_taming
from stage1_vqvae.model import VQVAE
from vqgen.cli import VqgenError, launch_state, refuse_existing, run_cli
from vqgen.files import atomic_dir, commit_dir, file_sha256
from vqgen.hub import looks_like_repo_id, resolve_folder

# The pixel range each known source's tokenizer was trained on (read from its training code, not its config).
KNOWN_RANGES = {
    "amused/amused-256": [0.0, 1.0],  # aMUSEd's VQGAN (open-muse) takes images in [0, 1]
    "amused/amused-512": [0.0, 1.0],
    "microsoft/vq-diffusion-ithq": [-1.0, 1.0],
    "CompVis/ldm-celebahq-256": [-1.0, 1.0],
    "vq_ds16_c2i.pt": [-1.0, 1.0],  # LlamaGen's released checkpoints, by file name
    "vq_ds8_c2i.pt": [-1.0, 1.0],
    "vq_ds16_t2i.pt": [-1.0, 1.0],
}


def parse_range(text: str) -> list[float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise VqgenError(f"--pixel_range {text!r}: expected two numbers, low,high (e.g. -1,1 or 0,1)") from None
    return [lo, hi]


def stated_license(root: Path) -> str:
    """The license the source's own card states (its YAML header), or that none was found."""
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            header = yaml.safe_load(text.split("---", 2)[1]) or {}
            if header.get("license"):
                return str(header["license"])
    return "not stated in the source's files"


def provenance(source: str, root: Path, weights: Path | None, kind: str, revision: str | None, pixel_range) -> dict:
    hub = looks_like_repo_id(source) and not Path(source).exists()
    return dict(
        source=source,
        kind=kind,
        subfolder=weights.parent.relative_to(root).as_posix() if weights and weights.parent != root else None,
        revision=revision or (root.name if hub else None),  # a snapshot folder is named by its commit
        weights_file=weights.name if weights else None,
        weights_sha256=file_sha256(weights) if weights else None,
        license=stated_license(root),
        pixel_range=pixel_range,
    )


def from_vqmodel(args, pixel_range: list[float]) -> VQVAE:
    patterns = ["README.md", *([f"{args.subfolder}/*"] if args.subfolder else ["*.json", "*.safetensors", "*.bin"])]
    root = resolve_folder(args.source, "tokenizer", allow_patterns=patterns, revision=args.revision)
    folder = root / args.subfolder if args.subfolder else root
    if not folder.is_dir():
        raise VqgenError(f"{args.source} has no subfolder {args.subfolder!r}")
    model = import_vqmodel(folder, args.resolution, pixel_range)
    weights = next((p for p in sorted(folder.glob("diffusion_pytorch_model.*")) if p.is_file()), None)
    model.tokenizer_source = provenance(args.source, root, weights, "diffusers.VQModel", args.revision, pixel_range)
    return model


def from_checkpoint(args, pixel_range: list[float]) -> VQVAE:
    """A local checkpoint file: taming/LDM with --config, LlamaGen (recognised by its keys) without."""
    path = Path(args.source)
    if args.config is not None:
        model, ema = import_taming(path, Path(args.config), args.resolution, pixel_range, use_ema=args.ema != "off")
        kind = "taming/latent-diffusion VQGAN checkpoint" + (" (its EMA weights)" if ema else "")
    else:
        model = import_llamagen(path, args.resolution, pixel_range, use_ema=args.ema == "on")
        kind = "LlamaGen VQ checkpoint" + (" (its EMA weights)" if args.ema == "on" else " (its model weights)")
    model.tokenizer_source = provenance(str(path), path.parent, path, kind, None, pixel_range)
    return model


def write_folder(model: VQVAE, out: Path) -> Path:
    """The stage-1 folder (save_pretrained, with tokenizer_source.json and the card's provenance), all or nothing."""
    tmp = atomic_dir(out)
    try:
        model.save_pretrained(tmp)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a diffusers VQModel folder, or a Hub repo id")
    parser.add_argument("--output_dir", required=True, help="the vqgen stage-1 folder to write")
    parser.add_argument("--subfolder", default=None, help="the VQModel's folder inside the source (e.g. vqvae)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the config's sample_size)")
    parser.add_argument("--pixel_range", default=None, help="low,high the tokenizer takes pixels in (e.g. 0,1)")
    parser.add_argument("--config", default=None, help="a taming/latent-diffusion checkpoint's config YAML")
    parser.add_argument("--ema", default="auto", choices=["auto", "on", "off"],
                        help="auto: a taming/LDM checkpoint's model_ema.* weights where it has them")  # fmt: skip
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args(argv)
    state = launch_state()  # under a launcher: every rank checks, the main process writes (as export does)
    out = Path(args.output_dir)
    refuse_existing(out, args.overwrite_output_dir)
    if args.pixel_range is not None:
        pixel_range = parse_range(args.pixel_range)
    elif (known := KNOWN_RANGES.get(args.source.rstrip("/"), KNOWN_RANGES.get(Path(args.source).name))) is not None:
        pixel_range = known
    else:
        raise VqgenError(
            f"the pixel range {args.source} was trained on is not known to vqgen: pass --pixel_range -1,1 (taming, "
            "latent-diffusion, VQ-Diffusion, LlamaGen) or --pixel_range 0,1 (aMUSEd), as its training code uses"
        )
    model = from_checkpoint(args, pixel_range) if Path(args.source).is_file() else from_vqmodel(args, pixel_range)
    c = model.config
    # How its images are prepared: the tokenizer's side and channels; the source is the user's (data.source=...).
    model.data_config = dict(source=None, resolution=c.image_size, channels="RGB" if c.in_channels == 3 else "L")
    state.wait_for_everyone()  # every rank has read and checked the source: the main process alone writes
    if state.is_main_process:
        write_folder(model, out)
        grid = f"{c.grid_size}x{c.grid_size}"
        print(f"imported {args.source} to {out}: {c.image_size} px images, {grid} codes of K={c.codebook_size}")
    state.wait_for_everyone()
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
