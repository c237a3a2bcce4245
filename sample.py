"""Make new images from the command line: a thin CLI over `VQGenPipeline` (prior sampling -> VQ-VAE decoder).

    python sample.py --pipeline runs/mnist/pipeline --per_class 10 --output_dir samples/
    python sample.py --vqvae runs/mnist/stage1/model --prior runs/mnist/stage2/model --classes 3,3,7
    python sample.py --pipeline user/vqgen-mnist --num_images 64 --temperature 0.9 --top_k 100 --seed 1
    python sample.py --pipeline ... --per_class 4 --guidance_scale 3.0        # classifier-free guidance
    python sample.py --pipeline ... --complete digit.png --keep_rows 3 --num_images 8   # image completion
    python sample.py --pipeline ... --num_images 10000 --compile   # many batches: compile the decode step once

Writes into --output_dir (atomically): grid.png (one row per class when conditional), one PNG per image named
{index:05d}_class{c}.png (or {index:05d}.png), and samples.json with every setting, the seed and both models'
fingerprints. The same seed gives the same images for the same decoding (and jacobi window), batch size and device:
the default decoding follows --batch_size (jacobi at 1), and another decoding or batch size draws other images
from the same distribution.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from stage1_vqvae.model import VQVAE
from stage2_prior.model import load_prior
from stage2_prior.pipeline import VQGenPipeline
from vqgen.cli import VqgenError, launch_state, run_cli
from vqgen.files import atomic_dir, commit_dir, safe_name, write_json
from vqgen.hub import state_fingerprint
from vqgen.images import labelled_rows


def load_pipeline(args, device: torch.device) -> VQGenPipeline:
    if args.pipeline:
        if args.vqvae or args.prior:
            raise VqgenError("pass either --pipeline or --vqvae and --prior, not both")
        return VQGenPipeline.from_pretrained(args.pipeline).to(device)
    if not (args.vqvae and args.prior):
        raise VqgenError("pass --pipeline FOLDER_OR_REPO, or both --vqvae and --prior")
    return VQGenPipeline(VQVAE.from_pretrained(args.vqvae), load_prior(args.prior)).to(device)


def requested_classes(args, pipe: VQGenPipeline) -> tuple[torch.Tensor | None, int]:
    """(class ids or None, how many images) from --classes / --per_class / --num_images."""
    chosen = [a for a in ("classes", "per_class", "num_images") if getattr(args, a) is not None]
    if len(chosen) > 1:
        raise VqgenError("pass only one of --classes, --per_class and --num_images")
    if args.per_class is not None:
        if args.per_class < 1:
            raise VqgenError("--per_class must be positive")
        classes = torch.arange(pipe.layout.num_classes).repeat_interleave(args.per_class)
        return pipe.class_ids(classes), len(classes)
    if args.classes is not None:
        classes = pipe.class_ids([c.strip() for c in args.classes.split(",")])
        return classes, len(classes)
    n = 16 if args.num_images is None else args.num_images
    if n < 1:
        raise VqgenError("--num_images must be positive")
    return None, n


def completion_prefix(args, pipe: VQGenPipeline, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image's own codes (1, h, w), the kept rows as a (n, rows * w) prefix) for --complete."""
    path = Path(args.complete)
    if not path.is_file():
        raise VqgenError(f"--complete {path}: no such file (pass one image file)")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise VqgenError(f"--complete {path}: cannot decode the image ({e})") from None
    height = pipe.layout.height
    rows = height // 2 if args.keep_rows is None else args.keep_rows
    if not 0 <= rows <= height:
        raise VqgenError(f"--keep_rows must be between 0 and {height} (the code grid's rows)")
    codes = pipe.encode_image(image)  # (1, h, w)
    return codes, codes.reshape(1, -1)[:, : rows * pipe.layout.width].expand(n, -1)  # (n, rows * w)


def write_outputs(args, pipe, out: Path, result, classes, n: int, original, stats: dict, device, elapsed) -> None:
    """The output folder, written atomically: the grid, one PNG per image, the completion strip, samples.json."""
    images = result.images  # (n, C, H, W) in [0, 1]
    tmp = atomic_dir(out)
    names = pipe.class_names
    per_row = args.per_class if args.per_class is not None else min(n, 10)
    grid = make_grid(images, nrow=per_row, padding=2)
    if args.per_class is not None:  # one row per class: name each row in a margin on the left
        grid = labelled_rows(grid, [str(c) for c in (names or range(pipe.layout.num_classes))])
    save_image(grid, tmp / "grid.png")
    files = []
    for i, img in enumerate(images):
        name = f"{i:05d}.png"
        if classes is not None:
            label = names[classes[i]] if names else int(classes[i])
            name = f"{i:05d}_class{safe_name(label)}.png"
        save_image(img, tmp / name)
        files.append(name)
    if original is not None:
        recon = pipe(classes=None, num_images=1, temperature=0, prefix_codes=original.reshape(1, -1), output_type="pt")
        side = torch.cat([recon.images, images])  # the image's own reconstruction, then the completions
        save_image(make_grid(side, nrow=len(side), padding=2), tmp / "completion.png")
    write_json(
        tmp / "samples.json",
        {
            "settings": {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite_output_dir")},
            # What sampled: the flags given, the prior's recommended settings (generation_config) for the rest.
            "sampling": stats["settings"],
            "sampling_from_generation_config": [k for k in stats["settings"] if getattr(args, k) is None],
            "decoding": stats["decoding"],
            "jacobi_window": stats["window"],
            # What a seed reproduces: other decodings, windows or batch sizes draw other images (same distribution).
            "same_images_with": "the same seed, decoding, jacobi_window, batch_size and device",
            "model_forwards": stats["forwards"],
            "seed": args.seed,
            "num_images": n,
            "classes": classes.tolist() if classes is not None else None,
            "class_names": names,
            "files": files,
            "vqvae_fingerprint": pipe.vqvae_fingerprint,
            "prior_fingerprint": state_fingerprint(pipe.prior),
            "device": str(device),
            "seconds": elapsed,
            "images_per_s": n / elapsed,
        },
    )
    commit_dir(tmp, out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="pipeline folder or Hub repo id (vqvae/, prior/)")
    parser.add_argument("--vqvae", default=None, help="VQ-VAE folder or Hub repo id (with --prior)")
    parser.add_argument("--prior", default=None, help="prior folder or Hub repo id (with --vqvae)")
    parser.add_argument("--num_images", type=int, default=None, help="unconditional images (default 16)")
    parser.add_argument("--per_class", type=int, default=None, help="this many images of every class")
    parser.add_argument("--classes", default=None, help="comma-separated class ids or names, e.g. 3,3,7")
    recommended = "default: the prior's recommended setting (its generation_config)"
    parser.add_argument("--temperature", type=float, default=None, help=f"0 is greedy; {recommended}")
    parser.add_argument("--top_k", type=int, default=None, help=f"0 is off; {recommended}")
    parser.add_argument("--top_p", type=float, default=None, help=f"1.0 is off; {recommended}")
    parser.add_argument("--guidance_scale", type=float, default=None, help=f"classifier-free guidance; {recommended}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--device", default=None, help="default: Accelerate's device (cuda when available)")
    parser.add_argument("--output_dir", default="samples")
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--complete", default=None, metavar="IMAGE", help="complete this image from its top rows")
    parser.add_argument("--keep_rows", type=int, default=None, help="code rows kept by --complete (default: half)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step with a static KV cache: same images, ~1.6x faster per batch on CPU "
        "after a one-off compilation of 10-30 s, so it pays for thousands of images, not for a grid",
    )
    parser.add_argument(
        "--decoding",
        choices=["sequential", "jacobi"],
        default=None,
        help="jacobi: speculative Jacobi decoding, the same distribution in fewer forwards (default: jacobi for "
        "one image at a time (--batch_size 1), where it pays on a CPU, sequential above)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise VqgenError("--batch_size must be positive")
    state = launch_state()  # under a launcher every rank draws the same images; the main process writes them
    device = torch.device(args.device) if args.device else state.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VqgenError(f"--device {args.device}: no CUDA GPU is usable here; drop --device or pass --device cpu")
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise VqgenError(
            f"{out} already holds files; pass --overwrite_output_dir or choose another --output_dir", every_rank=True
        )
    state.wait_for_everyone()  # every rank has checked the folder before the main process writes it

    pipe = load_pipeline(args, device)
    classes, n = requested_classes(args, pipe)
    original = prefix = None
    if args.complete is not None:
        original, prefix = completion_prefix(args, pipe, n)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with tqdm(total=n * pipe.layout.num_codes, desc="sampling", unit="tok") as bar:
        result = pipe(
            classes=classes,
            num_images=None if classes is not None else n,
            guidance_scale=args.guidance_scale,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
            output_type="pt",
            batch_size=args.batch_size,
            prefix_codes=prefix,
            compile=args.compile,
            decoding=args.decoding,
            progress=bar.update,
        )
    elapsed = time.perf_counter() - t0
    stats = dict(pipe.last_stats)  # this call's (--complete's reconstruction below is a call of its own)

    if state.is_main_process:
        write_outputs(args, pipe, out, result, classes, n, original, stats, device, elapsed)
        print(f"wrote {n} images to {out} ({n / elapsed:.1f} images/s)")
    state.wait_for_everyone()
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
