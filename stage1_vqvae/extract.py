"""Encode every split of a dataset into discrete code grids, saved as a Hugging Face dataset for stage 2.

    python -m stage1_vqvae.extract --model runs/mnist/stage1/model --output_dir runs/mnist/codes
    accelerate launch -m stage1_vqvae.extract --model user/vqvae-mnist --output_dir codes \
        --push_to_hub --hub_dataset_id user/mnist-codes
    python -m stage1_vqvae.extract --model ... --output_dir ... data.source=/path/to/images   # other images

Output: `data/` (`save_to_disk` layout, so `datasets.load_from_disk("OUT/data")` reads it) with one split per
source split, `codes: Array2D((h, w), int16)` (int32 when K > 32767) and `label: ClassLabel` when the source has
labels, in the source's order; and `vqgen_codes.json`, the `CodesMeta` contract stage 2 reads. Rows are
encoded in batches under no_grad and streamed to Arrow files, so memory does not grow with the dataset.
Under `accelerate launch`, each rank encodes a contiguous slice and the main process concatenates them in order.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator

from stage1_vqvae.codes import CODES_METADATA, CodesMeta, codes_fingerprint
from stage1_vqvae.data import data_config_for, find_columns, iter_image_batches, load_source, to_model_input
from stage1_vqvae.hub import hub_id, state_fingerprint, upload_folder
from stage1_vqvae.model import VQVAE
from stage1_vqvae.shared import (
    VqgenError,
    atomic_dir,
    commit_dir,
    deprecated_flags,
    deprecated_push_to_hub,
    run_cli,
    to_dict,
)

logger = logging.getLogger(__name__)

DATASET_CARD = """---
{{ card_data }}
---

# VQ-VAE code grids{% if source %} of `{{ source }}`{% endif %}

Discrete codes made by [vqgen](https://github.com/vqgen/vqgen) stage 1: every image encoded into a
{{ grid[0] }}x{{ grid[1] }} grid of indices into a codebook of K={{ codebook_size }} vectors
({{ image_size }}x{{ image_size }} images, {{ channels }} channel(s)).

- VQ-VAE: {% if vqvae_repo %}[`{{ vqvae_repo }}`](https://huggingface.co/{{ vqvae_repo }}), {% endif %}weights sha256
  fingerprint `{{ vqvae_fingerprint }}`
- splits: {% for k, v in splits.items() %}{{ k }} ({{ v }}) {% endfor %}

`vqgen_codes.json` holds this metadata for stage 2 (`python -m stage2_prior.train data.codes={{ repo_id }}`), which
refuses codes from another VQ-VAE. `datasets.load_dataset` reads the parquet files without vqgen.
"""


def _encode_slice(model, ds, data_cfg, split, start, stop, batch_size, device, dtype, has_label):
    """Generator of rows for Dataset.from_generator: encodes [start, stop) batch by batch."""
    for images, labels in iter_image_batches(ds, data_cfg, split, batch_size, start, stop):
        with torch.inference_mode():
            codes = model.encode(to_model_input(images.to(device))).cpu().numpy().astype(dtype)  # (B, h, w)
        for j in range(len(codes)):
            row = {"codes": codes[j]}
            if has_label:
                row["label"] = int(labels[j])
            yield row


def _encode_splits(dd, work, model, data_cfg, features, fingerprint, batch_size, dtype, label_col, accelerator):
    """Each rank encodes its contiguous slice of every split into work/{split}_{rank}."""
    rank, world = accelerator.process_index, accelerator.num_processes
    for split, ds in dd.items():
        n = len(ds)
        start, stop = n * rank // world, n * (rank + 1) // world
        try:
            part = datasets.Dataset.from_generator(
                _encode_slice,
                features=features,
                cache_dir=str(work / f"cache_{rank}"),
                # The model is hashed through its fingerprint, not pickled by datasets' hasher.
                fingerprint=f"{fingerprint[:16]}-{split}-{rank}-{world}-{start}-{stop}",
                gen_kwargs=dict(
                    model=model,
                    ds=ds,
                    data_cfg=data_cfg,
                    split=split,
                    start=start,
                    stop=stop,
                    batch_size=batch_size,
                    device=accelerator.device,
                    dtype=dtype,
                    has_label=label_col is not None,
                ),
            )
        except datasets.exceptions.DatasetGenerationError as e:
            # datasets wraps what the generator raised: surface our one-line error (a bad image, a bad label).
            cause = e.__cause__ or e.__context__
            if isinstance(cause, VqgenError):
                raise cause from None
            raise
        part.save_to_disk(str(work / f"{split}_{rank:05d}"))


def extract(
    model,
    data_cfg,
    out: Path,
    *,
    model_location: str,
    batch_size: int = 512,
    accelerator: Accelerator | None = None,
    overwrite: bool = False,
) -> Path:
    """Encode all splits into `out` (atomically: a temp folder renamed into place when complete)."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    out = Path(out)
    if out.exists() and not overwrite:
        raise VqgenError(f"{out} already exists; pass --overwrite_output_dir or choose another --output_dir")
    cfg = model.config
    channels, mode = (1 if data_cfg.channels == "L" else 3), ("L" if cfg.in_channels == 1 else "RGB")
    if (data_cfg.resolution, channels) != (cfg.image_size, cfg.in_channels):
        raise VqgenError(
            f"the VQ-VAE takes {cfg.image_size}x{cfg.image_size} images with {cfg.in_channels} channel(s), but "
            f"data.resolution={data_cfg.resolution} data.channels={data_cfg.channels} makes other images; drop "
            f"those overrides or set data.resolution={cfg.image_size} data.channels={mode}"
        )
    model = model.to(accelerator.device, memory_format=torch.channels_last).eval()
    h = w = cfg.grid_size
    dtype = np.int16 if cfg.codebook_size <= 32767 else np.int32
    dd = load_source(data_cfg)
    first = dd["train"]
    _, label_col = find_columns(first, data_cfg)
    features = {"codes": datasets.Array2D((h, w), "int16" if dtype == np.int16 else "int32")}
    class_names = None
    if label_col:
        class_names = first.features[label_col].names
        features["label"] = datasets.ClassLabel(names=class_names)
    features = datasets.Features(features)
    fingerprint = state_fingerprint(model)

    work = out.parent / f".{out.name}.work"
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _encode_splits(dd, work, model, data_cfg, features, fingerprint, batch_size, dtype, label_col, accelerator)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # nothing half-written stays behind
        raise
    world = accelerator.num_processes
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        tmp = atomic_dir(out)
        splits = {}
        for split in dd:
            parts = [datasets.load_from_disk(str(work / f"{split}_{r:05d}")) for r in range(world)]
            splits[split] = datasets.concatenate_datasets(parts) if world > 1 else parts[0]
        merged = datasets.DatasetDict(splits)
        merged.save_to_disk(str(tmp / "data"))
        CodesMeta(
            codebook_size=cfg.codebook_size,
            height=h,
            width=w,
            image_size=cfg.image_size,
            channels=cfg.in_channels,
            class_names=class_names,
            splits={k: len(v) for k, v in merged.items()},
            source=data_cfg.source,
            data_config=to_dict(data_cfg),
            vqvae_fingerprint=fingerprint,
            vqvae_location=model_location,
            codes_fingerprint=codes_fingerprint(merged),
        ).save(tmp)
        commit_dir(tmp, out)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def publish_codes(codes_dir: Path, repo_id: str, *, token: str | None = None, private: bool | None = None) -> str:
    """Publish a code dataset: the card and `vqgen_codes.json` first, then `DatasetDict.push_to_hub`, which
    writes data/{split}-*.parquet and adds the features and split sizes to the card's metadata."""
    from huggingface_hub import DatasetCard, DatasetCardData

    codes_dir = Path(codes_dir)
    meta = CodesMeta.load(codes_dir)
    dd = datasets.load_from_disk(str(codes_dir / "data"))
    # Only Hub ids mean something on the Hub; a local path would leak a user's file system into the card.
    source, vqvae_repo = hub_id(meta.source), hub_id(meta.vqvae_location)
    card = DatasetCard.from_template(
        DatasetCardData(
            pretty_name=f"VQ-VAE codes of {source or ('MNIST' if meta.source == 'mnist' else 'images')}",
            tags=["vqgen", "vq-vae", "image-tokens"],
            task_categories=["unconditional-image-generation"],
            source_datasets=[source] if source else None,
        ),
        template_str=DATASET_CARD,
        repo_id=repo_id,
        source=source or ("MNIST (built in)" if meta.source == "mnist" else None),
        vqvae_repo=vqvae_repo,
        grid=meta.grid,
        **{k: getattr(meta, k) for k in ("codebook_size", "vqvae_fingerprint", "image_size", "channels", "splits")},
    )
    try:
        with tempfile.TemporaryDirectory() as staging:
            card.save(Path(staging) / "README.md")
            shutil.copy(codes_dir / CODES_METADATA, Path(staging) / CODES_METADATA)
            upload_folder(Path(staging), repo_id, repo_type="dataset", token=token, private=private)
        info = dd.push_to_hub(repo_id, token=token, private=private, commit_message="Upload codes with vqgen")
    except Exception as e:  # offline, HTTP or connection errors of any transport: one clear line
        raise VqgenError(
            f"could not push the codes to the Hub dataset {repo_id} ({type(e).__name__}). The local copy in "
            f"{codes_dir} is complete; check your network and token, then run the same command again: it "
            "publishes the existing codes without extracting them again"
        ) from None
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="VQ-VAE folder or Hub repo id")
    parser.add_argument("--output_dir", required=True, help="output folder (data/ + vqgen_codes.json)")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--push_to_hub", action="store_true", help="also publish as a parquet dataset")
    parser.add_argument("--hub_dataset_id", default=None, help="the Hub dataset repo for --push_to_hub")
    parser.add_argument("--hub_private_repo", action="store_true")
    renames = {"--out": "--output_dir", "--overwrite": "--overwrite_output_dir", "--private": "--hub_private_repo"}
    argv = deprecated_flags(argv, {**renames, "--batch-size": "--batch_size"})
    argv = deprecated_push_to_hub(argv, "--hub_dataset_id")
    args, rest = parser.parse_known_args(argv)
    if args.batch_size < 1:
        raise VqgenError("--batch_size must be positive")
    if args.push_to_hub and not args.hub_dataset_id:
        raise VqgenError("--push_to_hub needs --hub_dataset_id owner/name")
    model = VQVAE.from_pretrained(args.model)
    data_cfg = data_config_for(model.data_config, rest)
    location = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    accelerator = Accelerator()
    out = Path(args.output_dir)
    if args.push_to_hub and (out / CODES_METADATA).is_file() and not args.overwrite_output_dir:
        # A complete extraction whose push failed: publish it as it is (the codes are not made again).
        CodesMeta.load(out).check_vqvae(
            model.config.codebook_size, model.config.grid_size, state_fingerprint(model), f"--model {args.model}"
        )
        logger.info("%s is complete; publishing it without extracting again", out)
    else:
        extract(
            model,
            data_cfg,
            out,
            model_location=location,
            batch_size=args.batch_size,
            accelerator=accelerator,
            overwrite=args.overwrite_output_dir,
        )
    if args.push_to_hub and accelerator.is_main_process:
        print(publish_codes(out, args.hub_dataset_id, private=args.hub_private_repo or None))
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
