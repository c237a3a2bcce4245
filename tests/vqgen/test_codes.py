"""The codes contract: fingerprints that cover the codes, checked on every load; metadata that must match."""

import json
import shutil

import datasets
import numpy as np
import pytest

from stage1_vqvae.data import (
    DataConfig,
)
from stage1_vqvae.extract import extract
from vqgen.cli import VqgenError
from vqgen.codes import codes_fingerprint, load_code_dataset


def test_codes_fingerprint_covers_the_codes_not_just_the_metadata():
    def dd(codes, labels):
        features = datasets.Features({"codes": datasets.Array2D((2, 2), "int16"), "label": datasets.Value("int64")})
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"codes": codes, "label": labels}, features)})

    base = codes_fingerprint(dd([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], [0, 1]))
    assert base == codes_fingerprint(dd([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], [0, 1]))
    assert base != codes_fingerprint(dd([[[1, 2], [3, 4]], [[5, 6], [7, 9]]], [0, 1]))  # one code differs
    assert base != codes_fingerprint(dd([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], [1, 1]))  # one label differs
    assert base != codes_fingerprint(dd([[[5, 6], [7, 8]], [[1, 2], [3, 4]]], [1, 0]))  # the order differs


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_a_code_changed_after_extraction_is_one_error_naming_both_fingerprints(tiny_model, image_folder, tmp_path,
                                                                               layout):  # fmt: skip
    import shutil

    from stage2_prior.data import CodeDataConfig, load_code_splits

    cfg = DataConfig(source=str(image_folder), resolution=16)
    out = extract(tiny_model, cfg, tmp_path / "codes", model_location="x")
    dd, meta = load_code_dataset(out)
    codes = dd["test"].with_format("numpy")[:]["codes"].copy()  # (8, 4, 4)
    codes[5, 2, 1] = (codes[5, 2, 1] + 1) % 16  # one code of one grid
    test = datasets.Dataset.from_dict({"codes": codes.tolist(), "label": dd["test"]["label"]}, dd["test"].features)
    edited = datasets.DatasetDict({**dd, "test": test})
    found = codes_fingerprint(edited)
    if layout == "save_to_disk":
        edited.save_to_disk(str(tmp_path / "edited"))
    else:  # the published layout, read from a local folder
        for split, ds in edited.items():
            ds.to_parquet(str(tmp_path / "edited" / f"{split}-00000-of-00001.parquet"))
    shutil.rmtree(out / "data")
    shutil.move(tmp_path / "edited", out / "data")
    for load in (
        lambda: load_code_dataset(out),
        lambda: load_code_splits(CodeDataConfig(codes=str(out))),
        lambda: load_code_splits(CodeDataConfig(codes=str(out), streaming=True)),
    ):
        with pytest.raises(VqgenError) as err:
            load()
        message = str(err.value)
        assert found[:16] in message and meta.codes_fingerprint[:16] in message and "re-run" in message


def test_codes_that_do_not_match_their_metadata_are_refused(tmp_path, image_folder, tiny_model):
    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.extract import extract
    from stage2_prior.data import CodeDataConfig, load_code_splits

    codes = extract(
        tiny_model, DataConfig(source=str(image_folder), resolution=16), tmp_path / "codes", model_location="none"
    )
    meta = json.loads((codes / "vqgen_codes.json").read_text())
    import datasets

    top = int(np.max(datasets.load_from_disk(str(codes / "data"))["train"].with_format("numpy")[:]["codes"]))
    meta["codebook_size"] = top  # the stored codes reach `top`, outside [0, top)
    (codes / "vqgen_codes.json").write_text(json.dumps(meta))
    with pytest.raises(VqgenError, match="outside"):
        load_code_splits(CodeDataConfig(codes=str(codes)))
    meta["codebook_size"], meta["height"], meta["width"] = 16, 8, 8
    (codes / "vqgen_codes.json").write_text(json.dumps(meta))
    with pytest.raises(VqgenError, match="grids but its metadata says"):
        load_code_splits(CodeDataConfig(codes=str(codes)))


def test_codes_published_in_several_parquet_shards_per_split_load_whole(tmp_path, tiny_model, image_folder):
    import datasets

    from stage1_vqvae.extract import extract
    from vqgen.codes import CODES_METADATA, load_code_dataset

    out = extract(
        tiny_model, DataConfig(source=str(image_folder), resolution=16), tmp_path / "codes", model_location="x"
    )
    local, _ = load_code_dataset(out)
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    shutil.copy(out / CODES_METADATA, hub.parent / CODES_METADATA)
    for split, ds in local.items():  # the layout DatasetDict.push_to_hub writes with num_shards=2
        for i in range(2):
            ds.shard(2, i, contiguous=True).to_parquet(str(hub / f"{split}-{i:05d}-of-00002.parquet"))
    loaded, _ = load_code_dataset(hub.parent)
    assert {s: len(v) for s, v in loaded.items()} == {s: len(v) for s, v in local.items()}
    for split in local:
        assert loaded[split]["codes"] == local[split]["codes"], split
    assert isinstance(loaded["train"], datasets.Dataset)
