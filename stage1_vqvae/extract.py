"""Encode every split of a dataset into discrete code grids, saved as a Hugging Face dataset for stage 2.

    python -m stage1_vqvae.extract --model runs/mnist/stage1/model --output_dir runs/mnist/codes
    accelerate launch -m stage1_vqvae.extract --model user/vqvae-mnist --output_dir codes \
        --push_to_hub --hub_dataset_id user/mnist-codes
    python -m stage1_vqvae.extract --model ... --output_dir ... data.source=/path/to/images   # other images

Output: `data/` (`save_to_disk` layout, so `datasets.load_from_disk("OUT/data")` reads it) with one split per
source split, `codes: Array2D((h, w), int16)` (int32 when K > 32767) and `label: ClassLabel` when the source has
labels, in the source's order; and `vqgen_codes.json`, the `CodesMeta` contract stage 2 reads.

At scale: images are decoded on the fly in DataLoader workers; codes are written as they are made, in parquet
shards of `--shard_rows` rows (every process its own shards under `accelerate launch`), with a progress bar in
images/s and time left. A killed extraction run again with the same command resumes from its complete shards,
and the result equals an uninterrupted run's row for row. Memory holds one shard at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator

from stage1_vqvae.data import LazyImageSplit, data_config_for, to_model_input
from stage1_vqvae.model import VQVAE
from stage1_vqvae.sources import find_columns, load_source
from vqgen.cli import VqgenError, refuse_existing, run_cli
from vqgen.codes import CODES_METADATA, CodesMeta, codes_fingerprint
from vqgen.config import to_dict
from vqgen.files import atomic_dir, commit_dir, release_freed_memory
from vqgen.hub import hub_id, state_fingerprint, upload_folder
from vqgen.preemption import EXIT_PREEMPTED, Stopper, ignore_stop_signals, mark_stopped

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


SHARD_ROWS = 10_000  # rows of one code shard: the unit of work, of resume and of memory


def _shard_bounds(n: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + shard_rows, n)) for lo in range(0, n, shard_rows)]


def _shard_path(work: Path, split: str, index: int) -> Path:
    return work / split / f"shard-{index:06d}.parquet"


def _check_shard(path: Path, rows: int, features: datasets.Features) -> None:
    """A shard left by an earlier run must be whole and of this extraction's schema; otherwise one clear error."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise VqgenError(
            f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}); delete it and run the same command again "
            "(only that shard is encoded again)"
        ) from None
    if meta.num_rows != rows or sorted(names) != sorted(features):
        raise VqgenError(
            f"{path} holds {meta.num_rows} rows of {names}, not the {rows} rows of {list(features)} this extraction "
            "writes; delete it and run the same command again"
        )


class _Stopped(Exception):
    """A stop signal arrived: the shard in progress was finished and written, no other was begun."""


def _encode_shards(dd, work, model, data_cfg, features, dtype, label_col, accelerator, batch_size, shard_rows, workers,
                   stopper=None):  # fmt: skip
    """Each rank encodes the shards i with i % world == rank that are not on disk yet; a shard is written to a
    temp file and renamed, so a file that exists is complete."""
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    todo = []
    for split, ds in dd.items():
        (work / split).mkdir(parents=True, exist_ok=True)
        for i, (lo, hi) in enumerate(_shard_bounds(len(ds), shard_rows)):
            path = _shard_path(work, split, i)
            if i % world != rank:
                continue
            if path.is_file():
                _check_shard(path, hi - lo, features)
            else:
                todo.append((split, i, lo, hi))
    total = sum(hi - lo for *_, lo, hi in todo)
    # Rank 0 shows its own progress (the ranks run at the same pace): images/s and the time left.
    bar = tqdm(total=total, desc="extracting", unit="img", disable=not accelerator.is_main_process, smoothing=0.1)
    try:
        for split, ds in dd.items():
            shards = [(i, lo, hi) for s, i, lo, hi in todo if s == split]
            if not shards:
                continue
            # One loader per split (its workers start once); batches never cross a shard's end.
            loader = torch.utils.data.DataLoader(
                LazyImageSplit(ds, data_cfg, split),
                batch_sampler=_ShardBatches(shards, batch_size),
                num_workers=workers,
                pin_memory=accelerator.device.type == "cuda",
                worker_init_fn=ignore_stop_signals if workers else None,  # the main process stops them
            )
            batches_left = iter(loader)
            try:
                for i, lo, hi in shards:
                    codes, labels, rows = [], [], 0
                    while rows < hi - lo:
                        batch = next(batches_left)
                        with torch.inference_mode():
                            x = to_model_input(batch["images"].to(accelerator.device, non_blocking=True))
                            codes.append(model.encode(x).cpu().numpy().astype(dtype))  # (B, h, w)
                        labels.append(batch["labels"].numpy())
                        rows += len(x)
                        bar.update(len(x))
                        release_freed_memory()  # else glibc's heap creeps up with the number of batches
                    columns = {"codes": np.concatenate(codes)}  # (rows, h, w)
                    if label_col is not None:
                        columns["label"] = np.concatenate(labels)
                    path = _shard_path(work, split, i)
                    tmp = path.with_suffix(f".tmp-{rank}")
                    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(tmp))
                    os.replace(tmp, path)
                    if stopper is not None and stopper.received is not None:
                        raise _Stopped(signal.Signals(stopper.received).name)
            finally:  # an error or a stop mid-split: its workers (which ignore SIGTERM) go now, not with a traceback
                shutdown = getattr(batches_left, "_shutdown_workers", None)  # multi-process iterators only
                if shutdown is not None:
                    shutdown()
    finally:  # closed on an error too (else its last line prints at exit)
        bar.close()


class _ShardBatches:
    """The batch sampler of extraction: `range`s of rows, shard after shard, none crossing a shard's end (made
    lazily: a list of every index would grow with the dataset)."""

    def __init__(self, shards: list[tuple[int, int, int]], batch_size: int):
        self.shards, self.batch_size = shards, batch_size

    def __iter__(self):
        for _, lo, hi in self.shards:
            for b in range(lo, hi, self.batch_size):
                yield range(b, min(b + self.batch_size, hi))

    def __len__(self) -> int:
        return sum(-(-(hi - lo) // self.batch_size) for _, lo, hi in self.shards)


def _complete_shards(work: Path) -> int:
    return sum(1 for _ in work.glob("*/shard-*.parquet")) if work.is_dir() else 0


def extract(
    model,
    data_cfg,
    out: Path,
    *,
    model_location: str,
    batch_size: int = 512,
    accelerator: Accelerator | None = None,
    overwrite: bool = False,
    shard_rows: int = SHARD_ROWS,
    num_workers: int | None = None,
) -> Path:
    """Encode all splits into `out`.

    Codes are written in parquet shards of `shard_rows` rows into `.{out}.work/` as they are made (every rank its
    own shards; images decoded in `num_workers` DataLoader workers, by default as many as the cores spare, up to
    4); a killed run started again with the same model and data keeps the complete shards and encodes the rest.
    When all are done the main process joins them in source order into `out` (a temp folder renamed into place),
    and the work folder goes. Memory holds one shard's codes at a time, so it is flat in the dataset's size.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    out = Path(out)
    refuse_existing(out, overwrite)
    if shard_rows < 1:
        raise VqgenError(f"--shard_rows must be positive, got {shard_rows}")
    cfg = model.config
    check_geometry(cfg, data_cfg)
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
    if num_workers is None:  # decoding is most of the work on a CPU: workers, when there are cores to spare
        num_workers = LazyImageSplit.default_workers(accelerator.num_processes)

    # The work folder resumes only the same extraction: the model, the data and the sharding must match.
    work = out.parent / f".{out.name}.work"
    manifest = {
        "vqvae_fingerprint": fingerprint,
        "data_config": to_dict(data_cfg),
        "shard_rows": shard_rows,
        "splits": {k: len(v) for k, v in dd.items()},
    }
    if accelerator.is_main_process:
        kept = work / "manifest.json"
        if work.exists() and (overwrite or not kept.is_file() or json.loads(kept.read_text()) != manifest):
            shutil.rmtree(work)
        if not work.exists():
            work.mkdir(parents=True)
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        elif _complete_shards(work):
            logger.info("resuming the extraction in %s: %d complete shards kept", work, _complete_shards(work))
    accelerator.wait_for_everyone()
    try:
        with Stopper(["SIGTERM", "SIGUSR1"]) as stopper:  # a signal finishes the shard in progress, then stops
            _encode_shards(dd, work, model, data_cfg, features, dtype, label_col, accelerator, batch_size, shard_rows,
                           num_workers, stopper)  # fmt: skip
    except _Stopped as e:
        logger.warning(
            "stopped by %s with %d complete shards in %s; the same command resumes from them (exit code %d)",
            e, _complete_shards(work), work, EXIT_PREEMPTED,
        )  # fmt: skip
        mark_stopped(str(e), str(work))
        raise SystemExit(EXIT_PREEMPTED) from None
    except BaseException as e:
        if not _complete_shards(work):
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: nothing stays behind
        elif isinstance(e, VqgenError):
            e.args = (
                f"{e}. The {_complete_shards(work)} complete shards in {work} are kept: the same command "
                "resumes from them",
            )
        raise
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        meta = dict(codebook_size=cfg.codebook_size, height=h, width=w, image_size=cfg.image_size,
                    channels=cfg.in_channels, class_names=class_names, source=data_cfg.source,
                    data_config=to_dict(data_cfg), vqvae_fingerprint=fingerprint,
                    vqvae_location=model_location, tokenizer_source=model.tokenizer_source)  # fmt: skip
        join_shards(work, out, {k: len(v) for k, v in dd.items()}, features, shard_rows, meta)
        sizes = ", ".join(f"{k} {len(v)}" for k, v in dd.items())
        print(f"saved the {h}x{w} codes of {sizes} images to {out}", flush=True)
    accelerator.wait_for_everyone()
    return out


def check_geometry(cfg, data_cfg) -> None:
    """The images the data config makes must be the ones the VQ-VAE takes: one error naming the overrides."""
    channels, mode = (1 if data_cfg.channels == "L" else 3), ("L" if cfg.in_channels == 1 else "RGB")
    if (data_cfg.resolution, channels) != (cfg.image_size, cfg.in_channels):
        raise VqgenError(
            f"the VQ-VAE takes {cfg.image_size}x{cfg.image_size} images with {cfg.in_channels} channel(s), but "
            f"data.resolution={data_cfg.resolution} data.channels={data_cfg.channels} makes other images; drop "
            f"those overrides or set data.resolution={cfg.image_size} data.channels={mode}"
        )


def join_shards(work: Path, out: Path, lengths: dict, features, shard_rows: int, meta: dict) -> None:
    """On the main process, once every shard is complete: the splits joined in source order into `out` (a temp
    folder renamed into place) with their CodesMeta, then the work folder removed."""
    tmp = atomic_dir(out)
    splits = {}
    for split, n in lengths.items():
        files = [str(_shard_path(work, split, i)) for i in range(len(_shard_bounds(n, shard_rows)))]
        # Arrow written batch by batch from the parquet shards: memory stays flat.
        splits[split] = datasets.Dataset.from_parquet(files, features=features, cache_dir=str(work / "cache"),
                                                      split=split)  # fmt: skip
    merged = datasets.DatasetDict(splits)
    merged.save_to_disk(str(tmp / "data"))
    splits_n = {k: len(v) for k, v in merged.items()}
    CodesMeta(**meta, splits=splits_n, codes_fingerprint=codes_fingerprint(merged)).save(tmp)
    del merged, splits  # release the memory-mapped cache before the work folder goes
    commit_dir(tmp, out)
    shutil.rmtree(work, ignore_errors=True)


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
        cause = str(e).split(" (", 1)[1].split(")", 1)[0] if isinstance(e, VqgenError) and " (" in str(e) else None
        cause = cause or f"{type(e).__name__}: {str(e)[:120]}"  # the upload's own cause, not "VqgenError"
        raise VqgenError(
            f"could not push the codes to the Hub dataset {repo_id} ({cause}). The local copy in "
            f"{codes_dir} is complete; check your network and token, then run the same command again: it "
            "publishes the existing codes without extracting them again"
        ) from None
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="VQ-VAE folder or Hub repo id")
    parser.add_argument("--output_dir", required=True, help="output folder (data/ + vqgen_codes.json)")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--shard_rows", type=int, default=SHARD_ROWS, help="rows per code shard (the unit of resume)")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers decoding images")
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--push_to_hub", action="store_true", help="also publish as a parquet dataset")
    parser.add_argument("--hub_dataset_id", default=None, help="the Hub dataset repo for --push_to_hub")
    parser.add_argument("--hub_private_repo", action="store_true")
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
            shard_rows=args.shard_rows,
            num_workers=args.num_workers,
        )
    if args.push_to_hub and accelerator.is_main_process:
        print(publish_codes(out, args.hub_dataset_id, private=args.hub_private_repo or None))
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
