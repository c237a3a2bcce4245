"""Code extraction: schema and order, shards and resume, a stream-trained model, pushes, bad input."""

import dataclasses
import multiprocessing

import datasets
import numpy as np
import pytest
import torch

from stage1_vqvae.data import DataConfig, ImageSplit, load_splits, to_model_input
from stage1_vqvae.extract import extract, publish_codes
from stage1_vqvae.sources import load_source
from vqgen.cli import VqgenError
from vqgen.codes import codes_fingerprint, load_code_dataset
from vqgen.hub import state_fingerprint

from helpers import make_id_source


def test_extraction_schema_order_and_metadata(tiny_model, image_folder, tmp_path):
    cfg = DataConfig(source=str(image_folder), resolution=16)
    out = extract(tiny_model, cfg, tmp_path / "codes", model_location="somewhere/vqvae", batch_size=5)
    dd, meta = load_code_dataset(out)
    assert set(dd) == {"train", "validation", "test"}
    assert dd["train"].features["codes"] == datasets.Array2D((4, 4), "int16")
    assert dd["train"].features["label"].names == ["a", "b"]
    src = load_source(cfg)
    for split in dd:
        expected = tiny_model.encode(to_model_input(ImageSplit(src[split], cfg).images))
        got = torch.from_numpy(dd[split].with_format("numpy")[:]["codes"])
        assert torch.equal(got.long(), expected), split  # same rows, same order, batch boundaries irrelevant
        assert dd[split]["label"] == src[split]["label"]
    assert meta.codebook_size == 16 and meta.grid == (4, 4) and meta.class_names == ["a", "b"]
    assert meta.vqvae_fingerprint == state_fingerprint(tiny_model)
    assert meta.vqvae_location == "somewhere/vqvae" and meta.source == str(image_folder)
    assert meta.data_config == dataclasses.asdict(cfg)
    assert meta.splits == {k: len(v) for k, v in dd.items()} and meta.image_size == 16
    assert meta.codes_fingerprint == codes_fingerprint(dd)
    # The plain datasets API reads the codes without vqgen.
    assert datasets.load_from_disk(str(out / "data"))["test"]["codes"] == dd["test"]["codes"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left behind
    with pytest.raises(VqgenError, match="already exists"):
        extract(tiny_model, cfg, out, model_location="x")


def test_published_code_dataset_loads_back_with_its_features(tiny_model, image_folder, tmp_path, fake_hub):
    out = extract(
        tiny_model, DataConfig(source=str(image_folder), resolution=16), tmp_path / "codes", model_location="me/vq"
    )
    publish_codes(out, "me/codes")
    remote = tmp_path / "remote" / "dataset" / "me" / "codes"
    assert sorted(p.name for p in (remote / "data").iterdir()) == [
        f"{s}-00000-of-00001.parquet" for s in ("test", "train", "validation")
    ]
    card = (remote / "README.md").read_text()
    assert "vqgen" in card and "K=16" in card and "me/vq" in card
    assert "dataset_info" in card and "num_examples" in card  # added by DatasetDict.push_to_hub to our card
    assert str(image_folder) not in card and str(tmp_path) not in card  # no local path on the Hub
    dd, meta = load_code_dataset(remote)
    local, _ = load_code_dataset(out)
    assert dd["train"].features["codes"] == datasets.Array2D((4, 4), "int16")
    assert dd["test"]["codes"] == local["test"]["codes"] and dd["train"]["label"] == local["train"]["label"]
    assert meta == load_code_dataset(out)[1]


def _codes(out):
    from vqgen.codes import load_code_dataset

    dd, meta = load_code_dataset(out)
    return {s: (dd[s]["codes"], dd[s]["label"]) for s in dd}, meta


def _interrupt_after(monkeypatch, n_shards):
    """Make the (n+1)-th shard commit die like a killed process (an exception no handler takes for an error)."""
    import stage1_vqvae.extract as ex

    real, calls = ex.os.replace, []

    def replace(src, dst):
        if str(dst).endswith(".parquet"):
            calls.append(dst)
            if len(calls) > n_shards:
                raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ex.os, "replace", replace)
    return calls


def test_an_interrupted_extraction_resumes_from_its_shards_and_equals_an_uninterrupted_one(
    tmp_path, tiny_model, image_folder, monkeypatch
):
    from stage1_vqvae.extract import extract

    cfg = DataConfig(source=str(image_folder), resolution=16)
    whole = extract(tiny_model, cfg, tmp_path / "whole", model_location="x", shard_rows=4, batch_size=3)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            extract(tiny_model, cfg, tmp_path / "codes", model_location="x", shard_rows=4, batch_size=3)
    work = tmp_path / ".codes.work"
    assert len(list(work.glob("*/shard-*.parquet"))) == 3 and not (tmp_path / "codes").exists()
    calls = _interrupt_after(monkeypatch, 10**9)  # count the shards the second run writes
    out = extract(tiny_model, cfg, tmp_path / "codes", model_location="x", shard_rows=4, batch_size=3)
    n_shards = sum(-(-n // 4) for n in _codes(whole)[1].splits.values())
    assert len(calls) == n_shards - 3  # the complete shards were kept, not encoded again
    (a, meta_a), (b, meta_b) = _codes(whole), _codes(out)
    assert a == b and meta_a.codes_fingerprint == meta_b.codes_fingerprint
    assert not work.exists()


def test_a_damaged_shard_is_one_clear_error_and_another_model_starts_afresh(
    tmp_path, tiny_model, tiny_config, image_folder, monkeypatch
):
    from stage1_vqvae.extract import extract
    from stage1_vqvae.model import VQVAE

    cfg = DataConfig(source=str(image_folder), resolution=16)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            extract(tiny_model, cfg, tmp_path / "codes", model_location="x", shard_rows=4)
    shard = sorted((tmp_path / ".codes.work").glob("*/shard-*.parquet"))[0]
    shard.write_bytes(b"truncated")
    with pytest.raises(VqgenError, match=r"shard-\d+\.parquet is damaged.*delete it and run the same command again"):
        extract(tiny_model, cfg, tmp_path / "codes", model_location="x", shard_rows=4)
    # Another model's codes never mix with these shards: the work folder is discarded and all is encoded anew.
    torch.manual_seed(5)
    other = VQVAE(tiny_config).eval()
    out = extract(other, cfg, tmp_path / "codes", model_location="x", shard_rows=4)
    expected = extract(other, cfg, tmp_path / "expected", model_location="x")
    assert _codes(out)[0] == _codes(expected)[0]


def test_extraction_of_a_stream_trained_model_encodes_the_streams_holdout(tmp_path, tiny_config):
    from stage1_vqvae.extract import main as extract
    from stage1_vqvae.model import VQVAE
    from vqgen.codes import load_code_dataset

    source = make_id_source(tmp_path / "src", 200, "parquet", 3)
    cfg = DataConfig(source=str(source), resolution=16, streaming=True, streaming_holdout=200)
    cfg.validation_fraction = cfg.test_fraction = 0.1
    torch.manual_seed(0)
    model = VQVAE(tiny_config)
    model.data_config = dataclasses.asdict(cfg)  # as a streamed training run saves it
    model.save_pretrained(tmp_path / "vq")
    extract(["--model", str(tmp_path / "vq"), "--output_dir", str(tmp_path / "codes")])
    dd, meta = load_code_dataset(tmp_path / "codes")
    streamed = load_splits(cfg, splits=("validation", "test"))
    for split in ("validation", "test"):
        with torch.no_grad():
            want = model.encode(to_model_input(streamed[split].images))  # (N, h, w)
        assert torch.equal(torch.tensor(np.asarray(dd[split].with_format("numpy")["codes"]), dtype=torch.long), want)
    assert meta.data_config["streaming"] is False  # what it read, map-style


def test_a_failed_code_push_is_retried_without_extracting_again(tmp_path, image_folder, tiny_model, fake_hub):
    from stage1_vqvae.extract import main

    tiny_model.data_config = {"source": str(image_folder), "resolution": 16}
    tiny_model.save_pretrained(tmp_path / "vq")
    args = ["--model", str(tmp_path / "vq"), "--output_dir", str(tmp_path / "codes")]
    args += ["--push_to_hub", "--hub_dataset_id", "me/codes"]
    real = fake_hub.create_repo

    def down(self, *a, **kw):
        raise ConnectionError("no route to host")

    fake_hub.create_repo = down
    with pytest.raises(VqgenError, match="could not push.*ConnectionError: no route to host"):  # the cause kept
        main(args)
    made = (tmp_path / "codes" / "vqgen_codes.json").stat().st_mtime_ns
    fake_hub.create_repo = real
    main(args)
    assert (tmp_path / "codes" / "vqgen_codes.json").stat().st_mtime_ns == made  # not extracted again
    assert (tmp_path / "remote" / "dataset" / "me" / "codes" / "vqgen_codes.json").is_file()


def test_bad_extraction_inputs_are_one_clear_error_and_leave_nothing(tmp_path, tiny_model, image_folder):
    for split in ("train", "validation", "test"):
        junk = tmp_path / "junk" / split / "a"
        junk.mkdir(parents=True)
        for i in range(2):
            (junk / f"{i}.png").write_bytes(b"not an image at all")
    with pytest.raises(VqgenError, match=r"cannot decode the image.*Remove or replace"):
        extract(
            tiny_model, DataConfig(source=str(tmp_path / "junk"), resolution=16), tmp_path / "c1", model_location="x"
        )
    # The failed split's workers are gone with the error, not left waiting (they ignore SIGTERM) until exit.
    assert not [c for c in multiprocessing.active_children() if c.daemon]
    with pytest.raises(VqgenError, match=r"16x16 images.*data.resolution=16"):
        extract(tiny_model, DataConfig(source=str(image_folder), resolution=32), tmp_path / "c2", model_location="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]  # no .work or temp folders
