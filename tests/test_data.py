"""Each data source, image-mode handling and clear errors for bad data."""

import gzip
import pickle
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from stage1_vqvae.data import (
    DataConfig,
    ImageSplit,
    find_columns,
    holdout_place,
    load_mnist_pickle,
    load_source,
    mnist_pickle_path,
    to_mode,
    to_model_input,
)
from vqgen.cli import VqgenError


def test_builtin_mnist_has_the_standard_splits_and_exact_pixels():
    dd = load_source(DataConfig(source="mnist"))
    assert {k: len(v) for k, v in dd.items()} == {"train": 50000, "validation": 10000, "test": 10000}
    assert dd["train"].features["label"].names == [str(i) for i in range(10)]
    (x, y), _, _ = load_mnist_pickle(mnist_pickle_path())
    split = ImageSplit(dd["train"].select(range(5)), DataConfig())
    expected = torch.from_numpy(np.rint(x[:5] * 256).reshape(5, 1, 28, 28).astype(np.uint8))
    assert torch.equal(split.images, expected)
    assert split.labels.tolist() == y[:5].tolist()


def test_mnist_pickle_is_not_unpickled_when_its_hash_differs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(gzip.compress(pickle.dumps(Evil())))
    with pytest.raises(VqgenError, match="refusing to unpickle"):
        load_mnist_pickle(bad)
    assert not marker.exists()


def test_imagefolder_source_gets_labels_and_its_own_splits(image_folder):
    cfg = DataConfig(source=str(image_folder), resolution=16)
    dd = load_source(cfg)
    assert {k: len(v) for k, v in dd.items()} == {"train": 24, "validation": 3, "test": 8}
    assert find_columns(dd["train"], cfg)[1] == "label"
    assert dd["train"].features["label"].names == ["a", "b"]


def test_parquet_and_save_to_disk_folders_load(image_folder, tmp_path):
    dd = load_source(DataConfig(source=str(image_folder), resolution=16))
    (tmp_path / "pq").mkdir()
    dd["train"].to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    dd["test"].to_parquet(str(tmp_path / "pq" / "test-00000.parquet"))
    dd["validation"].to_parquet(str(tmp_path / "pq" / "validation-00000.parquet"))
    dd.save_to_disk(str(tmp_path / "disk"))
    for src in (tmp_path / "pq", tmp_path / "disk"):
        loaded = load_source(DataConfig(source=str(src), resolution=16))
        split = ImageSplit(loaded["test"], DataConfig(source=str(src), resolution=16))
        assert split.images.shape == (8, 1, 16, 16)
        assert sorted(split.labels.tolist()) == [0] * 4 + [1] * 4


def test_an_unknown_hub_id_with_the_hub_unreachable_is_one_clear_error():
    with pytest.raises(VqgenError, match="Hub failed"):
        load_source(DataConfig(source="nobody/no-such-dataset"))


def test_a_corrupt_image_is_named_with_the_fix(tmp_path):
    d = tmp_path / "imgs" / "train" / "a"
    d.mkdir(parents=True)
    for i in range(12):  # distinct images: the carve puts copies of one image in one split
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(d / f"good{i}.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cfg = DataConfig(source=str(tmp_path / "imgs"), resolution=8, validation_fraction=0.3, test_fraction=0.3)
    with pytest.raises(VqgenError, match=r"broken\.png.*Remove or replace"):
        dd = load_source(cfg)
        for s in dd.values():
            ImageSplit(s, cfg)


def test_empty_folder_and_file_instead_of_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VqgenError, match="empty folder"):
        load_source(DataConfig(source=str(tmp_path / "empty")))
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(VqgenError, match="is a file"):
        load_source(DataConfig(source=str(tmp_path / "x.png")))


def test_missing_columns_name_the_override():
    ds = datasets.Dataset.from_dict({"x": [1, 2]})
    with pytest.raises(VqgenError, match="data.image_column"):
        find_columns(ds, DataConfig())


def test_labels_outside_the_class_names_are_reported():
    img = Image.fromarray(np.zeros((4, 4), np.uint8))
    raw = datasets.Dataset.from_dict(
        {"image": [img, img], "label": [0, 7]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    # The same Arrow table under a ClassLabel feature of two names: what a hand-edited parquet file can hold.
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset(raw.data, info=datasets.DatasetInfo(features=features))
    with pytest.raises(VqgenError, match="label 7 is outside the 2 class names"):
        ImageSplit(ds, DataConfig(resolution=4))


def test_image_modes_are_converted_to_8_bit_l_or_rgb():
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.array(to_mode(sixteen, "L")).max() == 255
    assert np.array(to_mode(Image.fromarray(np.full((4, 4), 32768, np.uint16)), "L")).max() == 128
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink: white
    assert np.array(to_mode(cmyk, "RGB")).min() == 255
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))  # fully transparent: composited onto black
    assert np.array(to_mode(rgba, "L")).max() == 0
    pal = Image.new("P", (4, 4))
    pal.putpalette([10, 20, 30] * 256)
    assert np.array(to_mode(pal, "RGB"))[0, 0].tolist() == [10, 20, 30]


def test_resize_modes_produce_the_resolution(image_folder):
    big = Image.fromarray(np.zeros((10, 30), np.uint8) + 200)
    from stage1_vqvae.data import ImageTransform

    for mode in ("crop", "pad", "stretch"):
        out = ImageTransform(DataConfig(resolution=8, resize_mode=mode, channels="RGB"))(big)
        assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
    padded = ImageTransform(DataConfig(resolution=9, resize_mode="pad"))(big)
    assert padded[0, 0, 4] == 0 and padded[0, 4, 4] > 150  # letterboxed: black above, image in the middle


def test_scaling_round_trips_all_256_levels():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_input(levels)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), levels)  # the inverse map


def test_missing_splits_are_carved_by_a_hash_of_each_image_test_apart_from_validation(tmp_path):
    d = tmp_path / "imgs" / "train" / "a"
    d.mkdir(parents=True)
    for i in range(60):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(d / f"{i:03d}.png")
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(d / "copy_of_007.png")  # the same bytes as 007.png
    cfg = DataConfig(source=str(tmp_path / "imgs"), resolution=4, validation_fraction=0.2, test_fraction=0.2)
    first = load_source(cfg)
    pixel = {s: sorted(int(np.array(im)[0, 0]) for im in first[s]["image"]) for s in first}
    # The reference: each file's place from its own bytes, in the fixed bands (test [0, .2), validation [.2, .4)).
    expected = {"train": [], "validation": [], "test": []}
    for f in sorted(d.iterdir()):
        place = holdout_place({"bytes": f.read_bytes(), "path": None}, "test")
        split = "test" if place < 0.2 else "validation" if place < 0.4 else "train"
        expected[split].append(int(np.array(Image.open(f))[0, 0]))
    assert pixel == {s: sorted(v) for s, v in expected.items()}
    assert all(len(v) >= 5 for v in pixel.values())  # 12 expected in each held-out split
    # Test is scored, validation fits the decoder's sigma: they must not share an image, nor with train; a copy
    # goes where its original goes.
    assert not set(pixel["test"]) & set(pixel["validation"]) and not set(pixel["test"]) & set(pixel["train"])
    assert not set(pixel["validation"]) & set(pixel["train"])
    assert any(pixel[s].count(7) == 2 for s in pixel)
    # A row's split does not depend on the row order, or on whether the source brings its own validation split.
    shutil.copytree(tmp_path / "imgs" / "train", tmp_path / "with_val" / "train")
    Image.fromarray(np.full((4, 4), 200, np.uint8)).save(tmp_path / "with_val" / "a.png")
    (tmp_path / "with_val" / "validation" / "a").mkdir(parents=True)
    shutil.move(tmp_path / "with_val" / "a.png", tmp_path / "with_val" / "validation" / "a" / "x.png")
    own_val = load_source(DataConfig(source=str(tmp_path / "with_val"), resolution=4, test_fraction=0.2))
    assert sorted(int(np.array(im)[0, 0]) for im in own_val["test"]["image"]) == pixel["test"]


def test_a_carve_that_comes_out_empty_says_which_fraction_to_raise(tmp_path):
    d = tmp_path / "imgs" / "train" / "a"
    d.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(d / f"{i}.png")
    with pytest.raises(VqgenError, match=r"no image fell into the carved .* raise data\.\w+_fraction"):
        load_source(DataConfig(source=str(tmp_path / "imgs"), resolution=4, validation_fraction=1e-6))


def test_float_images_in_0_1_are_scaled_not_black():
    ramp = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), mode="F")
    assert np.array(to_mode(ramp, "L")).ravel().tolist() == [int(v * 255 + 0.5) for v in np.linspace(0, 1, 16)]
    levels = Image.fromarray(np.full((4, 4), 200.0, np.float32), mode="F")  # floats in 0..255 stay as they are
    assert np.array(to_mode(levels, "L")).max() == 200
