"""The one contract between the stages: what extraction writes next to the code grids and stage 2 reads.

A code dataset folder holds `data/` (a `datasets.DatasetDict` saved with `save_to_disk`: `codes:
Array2D((h, w), int16|int32)` and `label: ClassLabel` when the source has labels) and `vqgen_codes.json`, a
serialised `CodesMeta`. The prior keeps the CodesMeta it learned from in `config.vqgen["codes"]`, so every later
pairing (codes, VQ-VAE, pipeline) is checked against it by `CodesMeta.check_*`.

    datasets.load_from_disk("runs/mnist/codes/data")     # the codes alone, without vqgen
    dd, meta = load_code_dataset("runs/mnist/codes")     # with the contract
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vqgen.cli import VqgenError
from vqgen.config import from_dict
from vqgen.files import write_json

CODES_METADATA = "vqgen_codes.json"
CODES_FORMAT = "vqgen-codes/2"


@dataclass
class CodesMeta:
    codebook_size: int  # K
    height: int  # code grid rows
    width: int  # code grid columns
    image_size: int  # side of the images the grids encode
    channels: int  # 1 (L) or 3 (RGB)
    class_names: list[str] | None  # None: the source has no labels
    splits: dict  # split name -> number of rows
    source: str  # the image source the codes were extracted from (data.source)
    data_config: dict  # the full DataConfig of the extraction: images for the two-stage bound come from here
    vqvae_fingerprint: str  # sha256 of the VQ-VAE's state dict (`hub.state_fingerprint`)
    vqvae_location: str | None  # where that VQ-VAE was loaded from (a folder or a Hub id)
    codes_fingerprint: str  # sha256 of every split's codes and labels, in order (`codes_fingerprint`)
    format: str = CODES_FORMAT
    # An imported tokenizer's provenance (its source, and the sha256 of the source's weights file): the chain
    # codes -> VQ-VAE fingerprint -> source file. None for a VQ-VAE trained by vqgen.
    tokenizer_source: dict | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return (self.height, self.width)

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / CODES_METADATA, dataclasses.asdict(self))

    @classmethod
    def from_json_dict(cls, data: dict, where: str) -> CodesMeta:
        if not isinstance(data, dict) or data.get("format") != CODES_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise VqgenError(f"{where} is in format {found!r}, not {CODES_FORMAT!r}; re-run stage1_vqvae.extract")
        return from_dict(cls, data, where)

    @classmethod
    def load(cls, folder: Path) -> CodesMeta:
        path = Path(folder) / CODES_METADATA
        if not path.is_file():
            raise VqgenError(f"{folder} has no {CODES_METADATA}; it was not written by stage1_vqvae.extract")
        try:
            return cls.from_json_dict(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise VqgenError(f"{path} is not valid JSON ({e}); re-run stage1_vqvae.extract") from None

    def check_vqvae(self, codebook_size: int, grid_size: int, fingerprint: str, what: str) -> None:
        """Raise unless a VQ-VAE (its K, grid side and fingerprint) is the one that made these codes."""
        if codebook_size != self.codebook_size:
            raise VqgenError(f"{what} has K={codebook_size} but the codes were made with K={self.codebook_size}")
        if (grid_size, grid_size) != self.grid:
            raise VqgenError(f"{what} makes {grid_size}x{grid_size} code grids but the codes are {self.grid}")
        if fingerprint != self.vqvae_fingerprint:
            raise VqgenError(
                f"{what} is VQ-VAE {fingerprint[:16]}… but the codes come from VQ-VAE {self.vqvae_fingerprint[:16]}… "
                "(fingerprints differ). Use the matching VQ-VAE, or re-extract the codes and retrain the prior"
            )

    def check_same_vqvae(self, other: CodesMeta, what: str) -> None:
        """Raise unless `other` (codes met later) come from the VQ-VAE that made these codes."""
        if other.codebook_size != self.codebook_size or other.grid != self.grid:
            raise VqgenError(
                f"{what} has K={other.codebook_size} and {other.grid} grids but the prior was trained for "
                f"K={self.codebook_size} and {self.grid} grids"
            )
        if other.vqvae_fingerprint != self.vqvae_fingerprint:
            raise VqgenError(
                f"{what} comes from VQ-VAE {other.vqvae_fingerprint[:16]}… but the prior was trained on codes of "
                f"VQ-VAE {self.vqvae_fingerprint[:16]}… (fingerprints differ). Use the matching codes or retrain"
            )


def codes_fingerprint(dd, lengths: dict | None = None) -> str:
    """sha256 over every split's name, codes and labels, row by row in order (chunks keep memory flat).

    `dd` holds map-style splits, or streamed ones (`datasets.IterableDataset`) with their row counts in `lengths`.
    """
    import numpy as np

    h = hashlib.sha256()
    for split in sorted(dd):
        ds = dd[split]
        n = lengths[split] if lengths is not None else len(ds)
        h.update(f"{split}|{n}|".encode())
        if lengths is None:
            ds = ds.with_format("numpy")
            chunks = (ds[lo : lo + 16384] for lo in range(0, n, 16384))
        else:
            chunks = ds.iter(batch_size=16384)
        for rows in chunks:
            h.update(np.asarray(rows["codes"]).astype("<i4").tobytes())  # (n, h, w) whatever the stored int width
            if "label" in rows:
                h.update(np.asarray(rows["label"]).astype("<i8").tobytes())
    return h.hexdigest()


def load_code_dataset(name_or_path: str | os.PathLike):
    """(DatasetDict, CodesMeta) from an extraction folder (save_to_disk) or a Hub dataset (parquet)."""
    import datasets

    from vqgen.hub import resolve_folder

    folder = resolve_folder(name_or_path, "code dataset", repo_type="dataset")
    meta = CodesMeta.load(folder)
    if (folder / "data" / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(folder / "data"))
    else:
        files: dict[str, list[str]] = {}  # push_to_hub writes data/{split}-00000-of-0000N.parquet, N >= 1
        for p in sorted((folder / "data").glob("*.parquet")):
            files.setdefault(p.name.split("-")[0], []).append(str(p))
        if not files:
            raise VqgenError(f"{folder} holds no code data (data/dataset_dict.json or data/*.parquet)")
        dd = datasets.load_dataset("parquet", data_files=files)
    check_codes_fingerprint(dd, meta, str(name_or_path))
    return dd, meta


def check_codes_fingerprint(dd, meta: CodesMeta, where: str, streamed: bool = False) -> None:
    """Raise unless the codes are the ones extraction wrote (`meta.codes_fingerprint`): an edited, swapped or
    truncated file would pass every other check while the prior learns other codes than it says. `streamed`:
    `dd` holds streams, read through once here."""
    found = codes_fingerprint(dd, meta.splits if streamed else None)
    if found != meta.codes_fingerprint:
        raise VqgenError(
            f"code dataset {where}: its codes hash to {found[:16]}… but its {CODES_METADATA} records "
            f"{meta.codes_fingerprint[:16]}… (codes_fingerprint): the data was changed after extraction. Restore "
            "the files or re-run stage1_vqvae.extract"
        )
