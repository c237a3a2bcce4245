"""The field's sample metrics for any pipeline or image folder: FID, KID, Inception Score, precision and recall,
computed as torch-fidelity computes them (vqgen.metrics), each next to a size-matched real reference.

    python -m stage2_prior.evaluate_samples --pipeline runs/demo/pipeline --num_samples 10000 --split test \\
        --output_dir runs/demo/fid                            # draws the samples (sharded under accelerate launch)
    python -m stage2_prior.evaluate_samples --samples runs/demo/samples --split test   # a sample.py folder
    python -m stage2_prior.evaluate_samples --samples my_images/ data.source=/path/to/photos --split validation

The scored split comes from the pipeline's VQ-VAE data config (or `data.key=value` overrides; MNIST by default
for a folder). Its Inception features, mean and covariance are computed once and cached beside the data (keyed by
the split's fingerprint and the Inception file's digest).

- FID and KID compare with the whole split; precision and recall (k=3) with a random subset of it of the samples'
  size and class counts, since k-NN radii depend on the set size; the Inception Score is the samples' own.
- Class-conditional pipelines draw `num_samples` evenly over the classes, and every real set is drawn with the
  samples' class counts; `--unconditional` scores class-free.
- The size-matched real reference: `--reference_draws` sets of as many real training images, drawn like the
  samples, scored the same way (mean and spread). FID is biased upwards at small N: compare with that reference,
  or with published figures only at their N (50,000 for ImageNet and CIFAR tables).
- Under `accelerate launch` the samples are drawn in chunks of `--batch_size`, chunk c seeded by (seed, c) and
  taken by rank c mod P: the images, and so every figure, do not depend on the number of processes.

Features are Inception-V3 pool3 (2048-d) and the bias-free logits, in float32 (never bf16). torch-fidelity's own
default for precision/recall is VGG16 features; vqgen uses Inception pool3 for all four, as the ADM evaluator
behind the LlamaGen/VAR tables does.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from stage1_vqvae.data import DataConfig, data_config_for, load_splits
from stage1_vqvae.sources import _cache_root
from stage2_prior.references import check_like, draw_like, score_samples
from vqgen.cli import VqgenError, report_metrics, run_cli
from vqgen.metrics import scores, standard
from vqgen.metrics.fidelity import KEYS, ReferenceSplit, eval_batch_size, features_of, gather_rows

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of sample chunk `chunk`: one stream per chunk, whichever rank draws it."""
    return (seed * 1_000_003 + chunk) % (2**63)


def asked_classes(pipe, num_samples: int, unconditional: bool) -> torch.Tensor | None:
    """The classes of the samples: evenly over the pipeline's classes (in blocks), or None."""
    if unconditional or pipe.layout.num_classes == 0:
        return None
    k = pipe.layout.num_classes
    if num_samples % k:
        raise VqgenError(
            f"--num_samples {num_samples} is not a multiple of the {k} classes; use {num_samples // k * k}"
        )
    return torch.arange(k).repeat_interleave(num_samples // k)


@torch.no_grad()
def sharded_features(accelerator, make_images, n: int, batch_size: int, extractor) -> dict:
    """Features of n images made chunk by chunk (`make_images(chunk_index, rows) -> uint8 (b, C, H, W)`), the chunks
    shared round-robin among the processes and gathered back in row order. Also returns the images' shape."""
    n_chunks = -(-n // batch_size)
    ids, parts, shape = [], {k: [] for k in KEYS}, None
    for c in range(accelerator.process_index, n_chunks, accelerator.num_processes):
        rows = torch.arange(c * batch_size, min(n, (c + 1) * batch_size))
        images = make_images(c, rows)
        shape = tuple(images.shape[1:])
        f = features_of(extractor, images, batch_size)
        ids.append(rows)
        for k in KEYS:
            parts[k].append(f[k])
    if accelerator.num_processes > 1:  # a rank that drew no chunk (n <= batch_size x (P - 1)) learns it from rank 0
        shape = broadcast_object_list([shape])[0]
    empty = torch.zeros(0, dtype=torch.long)
    row_ids = torch.cat(ids) if ids else empty
    out = {}
    for k, width in zip(KEYS, (2048, 1008)):
        local = torch.cat(parts[k]) if parts[k] else torch.zeros(0, width)
        out[k] = gather_rows(accelerator, row_ids, local, n)
    return {**out, "shape": shape}


def pipeline_sampler(pipe, classes, seed: int, settings: dict):
    def make(chunk: int, rows: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=pipe.device).manual_seed(chunk_seed(seed, chunk))
        asked = classes[rows] if classes is not None else None
        out = pipe(classes=asked, num_images=len(rows), generator=generator, output_type="pt",
                   batch_size=len(rows), **settings)  # fmt: skip
        return out.images.mul(255).round().to(torch.uint8)  # (b, C, H, W) as a saved PNG holds it

    return make


def read_folder(folder: Path) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A sample.py folder (its samples.json: files and classes) or any folder of images (sorted, no classes)."""
    if not folder.is_dir():
        raise VqgenError(f"--samples {folder} is not a folder")
    info_path = folder / "samples.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        files, classes = [folder / f for f in info["files"]], info.get("classes")
    else:
        files, classes = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), None
    if not files:
        raise VqgenError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                img = img.convert("L" if img.mode in ("L", "1", "I;16", "I") else "RGB")
                images.append(torch.from_numpy(np.array(img)).reshape(img.height, img.width, -1))  # (H, W, C)
        except (OSError, UnidentifiedImageError) as e:
            raise VqgenError(f"{f} is not a readable image ({e}); remove it or replace it") from None
    images = [x.permute(2, 0, 1).contiguous() for x in images]  # (C, H, W) uint8 each
    return images, torch.tensor(classes) if classes is not None else None


@torch.no_grad()
def folder_features(images: list[torch.Tensor], extractor, batch_size: int) -> dict:
    """Features of images of any sizes: consecutive images of one shape go through together."""
    parts, i = {k: [] for k in KEYS}, 0
    while i < len(images):
        j = i
        while j < len(images) and j - i < batch_size and images[j].shape == images[i].shape:
            j += 1
        f = features_of(extractor, torch.stack(images[i:j]), batch_size)
        for k in KEYS:
            parts[k].append(f[k])
        i = j
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        logger.warning("the images have %d different shapes; each is resized to 299x299 for Inception", len(shapes))
    return {**{k: torch.cat(v) for k, v in parts.items()}, "shape": tuple(images[0].shape)}


def check_counts(n: int, kid_subset_size: int | None) -> None:
    """Every metric can be computed from n samples: said before any sample is drawn."""
    if n < scores.IS_SPLITS:
        raise VqgenError(f"{n} samples: the Inception Score needs at least {scores.IS_SPLITS} (its 10 splits)")
    if kid_subset_size is not None and kid_subset_size > n:
        raise VqgenError(f"--kid_subset_size {kid_subset_size} is more than the {n} samples; lower it or add samples")


def real_draws(train, asked, n: int, draws: int, batch_size: int, accelerator, extractor):
    """`real_pool(i)` for score_samples: features of the i-th set of n real training images drawn like the
    samples (seeded, the same on every rank; its images shared among the ranks like the samples)."""
    labels = getattr(train, "labels", None)  # a split in memory; one decoded on the fly reads its label column
    if labels is None:
        column = train.label_column
        labels = torch.tensor(train.raw[column]) if column else torch.full((len(train),), -1)
    generator = torch.Generator().manual_seed(0)
    picks = [draw_like(labels, asked, n, generator) for _ in range(draws)]  # drawn up front: errors come first

    def real_pool(i: int):
        def make(chunk: int, rows: torch.Tensor) -> torch.Tensor:
            return torch.stack([train[int(j)]["images"] for j in picks[i][rows]])

        f = sharded_features(accelerator, make, n, batch_size, extractor)
        return f["pool"], f["logits_unbiased"]

    return real_pool


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="pipeline folder or Hub repo id to draw samples from")
    parser.add_argument("--samples", default=None, help="a folder of images (a sample.py folder keeps its classes)")
    parser.add_argument(
        "--split", default="test", choices=["train", "validation", "test"],
        help="the real images scored against; train: the protocol of published ImageNet FIDs (LlamaGen, VAR, ADM), "
        "with the size-matched real reference drawn from test",
    )  # fmt: skip
    parser.add_argument("--num_samples", type=int, default=10000)
    parser.add_argument("--unconditional", action="store_true", help="draw/score without classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=100, help="samples per chunk (and per Inception batch)")
    for name, kind in (("guidance_scale", float), ("temperature", float), ("top_k", int), ("top_p", float)):
        parser.add_argument(f"--{name}", type=kind, default=None, help="null: the prior's generation_config")
    parser.add_argument("--decoding", default=None, choices=["sequential", "jacobi"])
    parser.add_argument("--reference_draws", type=int, default=3, help="real sets for the size-matched reference")
    parser.add_argument("--kid_subset_size", type=int, default=None, help="default: min(1000, samples)")
    parser.add_argument("--output_dir", default=None, help="write metrics.json here")
    parser.add_argument("--update_card", action="store_true", help="write the figures into the pipeline's card")
    standard.add_arguments(parser, lpips=False)
    args, rest = parser.parse_known_args(argv)
    if (args.pipeline is None) == (args.samples is None):
        raise VqgenError("pass --pipeline (to draw samples) or --samples (a folder of images), not both")
    if args.update_card and args.pipeline is None:
        raise VqgenError("--update_card writes into a pipeline folder's card: it needs --pipeline")
    if args.pipeline:  # a folder's count is known once it is read
        check_counts(args.num_samples, args.kid_subset_size)
    accelerator = Accelerator()
    cfg = standard.from_arguments(args)
    cfg.standard = "on"  # this command exists for these figures: a missing Inception file is an error
    extractor = standard.load_inception(cfg).to(accelerator.device)

    # Everything that can be refused is checked before the reference split's features and the samples are made.
    pipe, images, asked = None, None, None
    if args.pipeline:
        from stage2_prior.pipeline import VQGenPipeline

        pipe = VQGenPipeline.from_pretrained(args.pipeline).to(accelerator.device)
        data_cfg = data_config_for(pipe.vqvae.data_config, rest)
        asked = asked_classes(pipe, args.num_samples, args.unconditional)
        n = args.num_samples
    else:
        data_cfg = data_config_for({}, rest) if rest else DataConfig()
        images, asked = read_folder(Path(args.samples))
        asked = None if args.unconditional else asked
        n = len(images)
        check_counts(n, args.kid_subset_size)
    # The size-matched real sets come from a split other than the scored one: real images the statistics never saw.
    draw_from = "test" if args.split == "train" else "train"
    with accelerator.main_process_first():
        splits = load_splits(data_cfg, splits=tuple(dict.fromkeys((draw_from, args.split))))
    real_pool = real_draws(splits[draw_from], asked, n, args.reference_draws, args.batch_size, accelerator, extractor)
    scored = splits[args.split]
    loader = accelerator.prepare(
        DataLoader(scored, batch_size=eval_batch_size(len(scored), args.batch_size, accelerator.num_processes))
    )
    ref = ReferenceSplit.load_or_compute(splits[args.split], loader, extractor, accelerator, _cache_root(data_cfg))
    if asked is not None and (ref.labels < 0).any():
        draw_like(ref.labels, asked, n, torch.Generator())  # the error: class-conditional needs a labelled split

    if pipe is not None:
        settings = {k: getattr(args, k) for k in ("guidance_scale", "temperature", "top_k", "top_p", "decoding")}
        samples = sharded_features(accelerator, pipeline_sampler(pipe, asked, args.seed, settings), n,
                                   args.batch_size, extractor)  # fmt: skip
        source = {"pipeline": str(args.pipeline), "seed": args.seed, "settings": pipe.last_stats.get("settings")}
    else:
        samples = folder_features(images, extractor, args.batch_size) if accelerator.is_main_process else None
        samples = broadcast_object_list([samples])[0] if accelerator.num_processes > 1 else samples
        source = {"samples": str(args.samples)}
    check_like(samples["shape"], ref.image_shape)
    result = {**source, "split": args.split, "real_reference_split": draw_from, "class_conditional": asked is not None,
              "feature": "inception-v3 pool3"}  # fmt: skip
    result.update(score_samples(samples, asked, ref, real_pool, args.reference_draws, args.kid_subset_size))
    result["inception_weights_sha256"] = extractor.digest
    if accelerator.is_main_process:
        report_metrics(result, args.output_dir)
        if args.update_card:
            update_card(Path(args.pipeline), data_cfg, args.split, result)
    return result


def update_card(folder: Path, data_cfg, split: str, result: dict) -> None:
    from vqgen.hub import add_eval_results, dataset_label

    readme = folder / "README.md"
    if not readme.is_file():
        raise VqgenError(f"--update_card writes into a local pipeline folder's README.md; {readme} does not exist")
    add_eval_results(readme, folder.name, "image-generation", dataset_label(data_cfg.source), split, result)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
