"""Stage-1 data: every source, image modes, the held-out carve, decoding on the fly, augmentation, streams."""

import dataclasses
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
    LazyImageSplit,
    StreamingImages,
    data_config_for,
    load_splits,
    to_mode,
    to_model_input,
)
from stage1_vqvae.sources import find_columns, holdout_place, load_mnist_pickle, load_source, mnist_pickle_path
from vqgen.cli import VqgenError, user_message

from helpers import (
    make_id_source,
    make_tar_shards,
    row_ids,
    streamed_epoch,
)


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


def test_lossless_re_encodings_of_one_picture_land_in_one_split(tmp_path):
    # Audit 3, S4-9: the carve hashed the file's bytes, so a PNG re-saved at another compression level landed on
    # the other side of a 10% carve 18% of the time. It hashes the decoded pixels now.
    import io

    from PIL import PngImagePlugin

    rng = np.random.default_rng(0)
    d = tmp_path / "imgs" / "train" / "a"
    d.mkdir(parents=True)
    pictures, differ = [], 0
    for i in range(60):
        pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)  # (8, 8)
        pixels[0, 0] = i  # names the picture
        img = Image.fromarray(pixels)
        encodings = []
        for level, note in ((1, None), (9, "a copy with metadata")):
            info = PngImagePlugin.PngInfo()
            if note:
                info.add_text("comment", note)
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=level, pnginfo=info)
            encodings.append(buf.getvalue())
            (d / f"{i:03d}_level{level}.png").write_bytes(buf.getvalue())
        differ += encodings[0] != encodings[1]
        places = {holdout_place({"bytes": e, "path": None}, "t") for e in encodings}
        assert places == {holdout_place(img, "t")}  # one place: the pixels', whatever the encoding
        pictures.append(img)
    assert differ == 60  # every pair differs in its bytes
    carved = load_source(DataConfig(source=str(tmp_path / "imgs"), resolution=8, validation_fraction=0.3,
                                    test_fraction=0.3))  # fmt: skip
    where = {}
    for split in carved:
        for im in carved[split]["image"]:
            where.setdefault(int(np.array(im)[0, 0]), set()).add(split)
    assert len(where) == 60 and all(len(splits) == 1 for splits in where.values())  # both copies together
    assert {s for splits in where.values() for s in splits} == {"train", "validation", "test"}
    (d / "broken.png").write_bytes(b"\x89PNG not a picture")
    with pytest.raises(VqgenError, match=r"broken\.png\): cannot decode the image .* Remove or replace"):
        holdout_place({"bytes": None, "path": str(d / "broken.png")}, "t")


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


def test_decoding_on_the_fly_gives_the_in_memory_images(image_folder):
    cfg = DataConfig(source=str(image_folder), resolution=12, channels="RGB", resize_mode="crop")
    dd = load_source(cfg)
    for split in ("train", "test"):
        cached, lazy = ImageSplit(dd[split], cfg, split), LazyImageSplit(dd[split], cfg, split)
        assert len(lazy) == len(cached)
        loader = torch.utils.data.DataLoader(lazy, batch_size=5, num_workers=2)
        images = torch.cat([b["images"] for b in loader])
        labels = torch.cat([b["labels"] for b in loader])
        assert images.shape == (len(cached), 3, 12, 12) and images.dtype == torch.uint8
        assert torch.equal(images, cached.images) and torch.equal(labels, cached.labels)
        assert torch.equal(lazy.first_images(3), cached.images[:3])


def test_the_memory_budget_chooses_in_memory_or_on_the_fly(image_folder):
    src = str(image_folder)
    cached = load_splits(DataConfig(source=src), splits=("train", "validation"))
    assert all(isinstance(v, ImageSplit) for v in cached.values())
    lazy = load_splits(DataConfig(source=src, cache_max_gb=0), splits=("train", "validation"))
    assert all(isinstance(v, LazyImageSplit) for v in lazy.values())
    # A budget that holds the (smaller) validation split but not both: the smallest splits are cached first.
    n_val = len(cached["validation"])
    budget = (n_val * 28 * 28 + 1) / 2**30
    mixed = load_splits(DataConfig(source=src, cache_max_gb=budget), splits=("train", "validation"))
    assert isinstance(mixed["validation"], ImageSplit) and isinstance(mixed["train"], LazyImageSplit)
    # Crops drawn anew every epoch need the full image: a cropped train split is never cached.
    cropped = load_splits(DataConfig(source=src, augment="random_crop"), splits=("train",), augment_train=True)
    assert isinstance(cropped["train"], LazyImageSplit)


def test_augmentation_is_a_function_of_seed_epoch_and_row_whatever_the_worker(image_folder):
    cfg = DataConfig(source=str(image_folder), resolution=12, augment="random_resized_crop", hflip=True)
    ds = load_source(cfg)["train"]

    def epoch_images(split, epoch, workers):
        split.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(split, batch_size=4, num_workers=workers)
        return torch.cat([b["images"] for b in loader])

    a = LazyImageSplit(ds, cfg, augment=True, seed=3)
    b = LazyImageSplit(ds, cfg, augment=True, seed=3)
    first = epoch_images(a, 0, 0)
    assert torch.equal(first, epoch_images(b, 0, 2))  # another object, two workers: the same draws
    assert not torch.equal(first, epoch_images(a, 1, 0))  # a new epoch draws anew
    assert not torch.equal(first, epoch_images(LazyImageSplit(ds, cfg, augment=True, seed=4), 0, 0))
    plain = LazyImageSplit(ds, cfg)  # evaluation and extraction never augment
    assert torch.equal(epoch_images(plain, 0, 0), epoch_images(plain, 5, 0))


def test_a_random_crop_is_a_window_of_the_image_resized_to_the_shorter_side(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (24, 40), dtype=np.uint8)  # H=24, W=40
    for split in ("train", "validation", "test"):  # the source's own splits: copies would be carved together
        folder = tmp_path / "wide" / split / "x"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = DataConfig(source=str(tmp_path / "wide"), resolution=16, augment="random_crop", max_samples=4)
    split = LazyImageSplit(load_source(cfg)["train"], cfg, augment=True)
    resized = np.array(Image.fromarray(pixels).resize((27, 16), Image.BICUBIC))  # shorter side 24 -> 16
    offsets = set()
    for epoch in range(6):
        split.set_epoch(epoch)
        for i in range(len(split)):
            crop = split[i]["images"][0].numpy()
            hits = [x for x in range(27 - 16 + 1) if np.array_equal(resized[:, x : x + 16], crop)]
            assert len(hits) >= 1
            offsets.add(hits[0])
    assert len(offsets) > 3  # the window moves


def test_hflip_mirrors_about_half_of_the_images_and_changes_nothing_else(image_folder):
    cfg = DataConfig(source=str(image_folder), hflip=True)
    ds = load_source(cfg)["train"]
    plain = ImageSplit(ds, cfg)
    flipped = ImageSplit(ds, cfg, augment=True, seed=0)
    mirrored = 0
    for epoch in range(4):
        flipped.set_epoch(epoch)
        for i in range(len(plain)):
            x, y = plain[i]["images"], flipped[i]["images"]
            assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
            mirrored += not torch.equal(y, x)
    assert 0.3 < mirrored / (4 * len(plain)) < 0.7


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("augment", [False, True])
def test_a_stream_continues_from_the_checkpointed_position(tmp_path, workers, augment):
    # shuffle_buffer=1 keeps the rows in shard order, so the resumed stream must continue row for row; with
    # augmentation the crops and flips too (their draws count the rows the worker made, which resume restores).
    cfg = DataConfig(source=str(make_tar_shards(tmp_path / "wds", n_shards=4)), streaming=True, resolution=16)
    cfg.shuffle_buffer, cfg.streaming_holdout = 1, 4
    if augment:
        cfg.augment, cfg.hflip = "random_resized_crop", True
    stream = load_splits(cfg, splits=("train",), augment_train=augment)["train"]
    assert isinstance(stream, StreamingImages)
    from accelerate import PartialState
    from torchdata.stateful_dataloader import StatefulDataLoader

    from vqgen.streaming import load_stream_state, save_stream_state, stream_loader

    class Run:  # what stream_loader asks of an Accelerator
        process_index, num_processes, device = 0, 1, PartialState().device

    loader = stream_loader(stream, Run(), 3, workers)
    assert isinstance(loader, StatefulDataLoader)
    it = iter(loader)
    for _ in range(5):
        next(it)
    save_stream_state(loader, tmp_path, rank=0, world=1)  # as save_checkpoint saves it
    expected = [next(it)["images"] for _ in range(6)]  # crosses into the next epoch of 44 rows
    del it
    again = load_splits(cfg, splits=("train",), augment_train=augment)["train"]
    resumed = stream_loader(again, Run(), 3, workers)
    load_stream_state(resumed, tmp_path, rank=0, world=1)  # as load_checkpoint restores it, before the loop starts
    it = iter(resumed)
    for want in expected:
        assert torch.equal(next(it)["images"], want)
    with pytest.raises(VqgenError, match="checkpointed with 1 processes"):
        load_stream_state(resumed, tmp_path, rank=0, world=2)
    with pytest.raises(VqgenError, match="no stream position for rank 1"):
        load_stream_state(resumed, tmp_path, rank=1, world=2)
    resumed.num_workers = workers + 1
    with pytest.raises(VqgenError, match="checkpointed with train.num_workers"):
        load_stream_state(resumed, tmp_path, rank=0, world=1)


def test_a_corrupt_image_in_a_stream_is_one_clear_error_from_a_worker(tmp_path):
    source = make_tar_shards(tmp_path / "wds", n_shards=2, corrupt=(1, 5))
    cfg = DataConfig(source=str(source), streaming=True, resolution=16, streaming_holdout=2)
    stream = load_splits(cfg, splits=("train",))["train"].configure(batch_size=4, rank=0, world=1)
    with pytest.raises(VqgenError) as err:
        for _ in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2):
            pass
    message = user_message(err.value)
    assert "cannot decode the image" in message and "streamed split 'train'" in message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize(
    "kind, n_files",
    [("disk", 1), ("parquet", 4), ("parquet", 3)],  # 16 and 4 shards divide among 4 readers, 3 do not
)
def test_a_streamed_holdout_never_reaches_training_on_2_ranks_x_2_workers(tmp_path, monkeypatch, kind, n_files):
    # datasets sleeps 5 s whenever a parquet stream's iterator closes (an arrow issue it works around); not here.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    n = 240
    source = make_id_source(tmp_path / "src", n, kind, n_files)
    cfg = DataConfig(source=str(source), resolution=8, streaming=True, shuffle_buffer=1, streaming_holdout=n)
    cfg.validation_fraction = cfg.test_fraction = 0.1
    # The reference: every row's split from its own bytes (holdout_place), by brute force.
    raw = datasets.load_from_disk(str(source))["train"] if kind == "disk" else None
    if raw is None:
        raw = datasets.load_dataset(str(source), split="train")
    raw = raw.cast_column("image", datasets.Image(decode=False))
    places = [holdout_place(v, "ref") for v in raw["image"]]
    held = {"test": {i for i, p in enumerate(places) if p < 0.1}}  # rows are in source order: i is the id
    held["validation"] = {i for i, p in enumerate(places) if 0.1 <= p < 0.2}
    assert all(len(v) >= 10 for v in held.values())
    streamed = load_splits(cfg, splits=("validation", "test"))
    assert {s: set(row_ids(streamed[s].images)) for s in held} == held
    for world, workers in ((2, 2), (1, 0)):
        trained = streamed_epoch(cfg, world, workers)
        assert not trained & (held["test"] | held["validation"])
        # Every other row is trained on, but for each reader's last partial batch.
        assert len(set(range(n)) - held["test"] - held["validation"] - trained) < 4 * max(1, world * workers)
    # Evaluation and extraction read the source map-style: the same held-out rows.
    mapped = load_splits(data_config_for(dataclasses.asdict(cfg), []), in_memory=True)
    assert {s: set(row_ids(mapped[s].images)) for s in held} == held


def test_images_smaller_than_the_downsampling_are_resized_up(tmp_path):
    import numpy as np
    from PIL import Image

    from stage1_vqvae.data import DataConfig, ImageSplit
    from stage1_vqvae.sources import load_source

    for split in ("train", "validation", "test"):
        d = tmp_path / "imgs" / split / "x"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((2, 3), 50 * i, np.uint8)).save(d / f"{i}.png")
    cfg = DataConfig(source=str(tmp_path / "imgs"), resolution=16)
    split = ImageSplit(load_source(cfg)["train"], cfg)
    assert split.images.shape[1:] == (1, 16, 16)


def test_a_folder_where_an_image_is_expected(tmp_path):
    from types import SimpleNamespace

    from sample import completion_prefix

    with pytest.raises(VqgenError, match="pass one image file"):
        completion_prefix(SimpleNamespace(complete=str(tmp_path), keep_rows=None), None, 1)


def test_an_empty_split_is_one_clear_error(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.sources import load_source

    img = Image.fromarray(np.zeros((4, 4), np.uint8))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": [img] * 4, "label": [0] * 4}, features=features),
            "test": datasets.Dataset.from_dict({"image": [], "label": []}, features=features),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(VqgenError, match="split 'test' is empty"):
        load_source(DataConfig(source=str(tmp_path / "dd"), resolution=4))


def test_colour_images_under_channels_l_are_said_to_become_gray(caplog):
    from stage1_vqvae.data import ImageTransform

    transform = ImageTransform(DataConfig(resolution=4, channels="L"))
    with caplog.at_level("WARNING"):
        transform(Image.new("RGB", (4, 4), (200, 10, 10)))
        transform(Image.new("RGB", (4, 4), (200, 10, 10)))
    assert caplog.text.count("data.channels=RGB") == 1


def test_gray_images_under_channels_rgb_are_said_to_be_repeated(caplog):
    from stage1_vqvae.data import ImageTransform

    transform = ImageTransform(DataConfig(resolution=4, channels="RGB"))
    with caplog.at_level("WARNING"):
        out = [transform(Image.new("L", (4, 4), 90)) for _ in range(2)]
        transform(Image.new("RGB", (4, 4), (200, 10, 10)))
    assert caplog.text.count("set data.channels=L") == 1 and out[0].shape == (3, 4, 4)
