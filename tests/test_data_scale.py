"""Users' data at real size: decoding on the fly, streamed sources, augmentation drawn from (seed, epoch, row)."""

import dataclasses
import io
import json
import shutil
import tarfile

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
    holdout_place,
    load_source,
    load_splits,
    to_model_input,
)
from stage1_vqvae.train import main
from vqgen.cli import VqgenError, user_message
from vqgen.streaming import StreamPosition

from helpers import resumed_equals_uninterrupted, stage1_args


def make_tar_shards(root, n_shards=3, per_shard=12, corrupt=None, size=20):
    """WebDataset-style shards: {key}.png + {key}.cls in train-XXX.tar; `corrupt` = (shard, row) gets bad bytes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        with tarfile.open(root / f"train-{shard:03d}.tar", "w") as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
                png = b"not a png" if corrupt == (shard, i) else buf.getvalue()
                for ext, data in (("png", png), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"s{shard}_{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


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


def test_resume_is_bit_exact_when_decoding_on_the_fly_with_augmentation_and_workers(tmp_path, image_folder):
    common = ["train.max_steps=7", "train.checkpoint_every=3", "train.checkpoints_total_limit=5"]
    common += ["data.cache_max_gb=0", "data.augment=random_resized_crop", "data.hflip=true", "train.num_workers=2"]
    resumed_equals_uninterrupted(
        main,
        tmp_path / "a",
        tmp_path / "b",
        lambda out: stage1_args(out, image_folder, *common),
        ["checkpoint_6", "checkpoint_7"],
    )


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
    stream.configure(batch_size=3, rank=0, world=1)
    position = StreamPosition(stream, workers)
    it = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
    for _ in range(5):
        position.update(next(it)["position"])
    expected = [next(it)["images"] for _ in range(6)]  # crosses into the next epoch of 44 rows
    del it
    state = json.loads(json.dumps(position.state_dict(), default=int))  # survives a round trip
    state["workers"] = {int(k): v for k, v in state["workers"].items()}
    again = load_splits(cfg, splits=("train",), augment_train=augment)["train"].configure(batch_size=3, rank=0, world=1)
    StreamPosition(again, workers).load_state_dict(state)
    it = iter(torch.utils.data.DataLoader(again, batch_size=None, num_workers=workers))
    for want in expected:
        assert torch.equal(next(it)["images"], want)


def test_streamed_training_resumes_from_its_position_bit_exact_without_a_shuffle_buffer(tmp_path):
    source = make_tar_shards(tmp_path / "wds")
    common = [f"data.source={source}", "data.streaming=true", "data.shuffle_buffer=1", "data.streaming_holdout=4"]
    common += ["train.max_steps=7", "train.checkpoint_every=3", "train.checkpoints_total_limit=5"]

    def position_saved(out):
        assert (out / "checkpoints" / "checkpoint_3" / "custom_checkpoint_0.pkl").is_file()

    resumed_equals_uninterrupted(
        main,
        tmp_path / "a",
        tmp_path / "b",
        lambda out: stage1_args(out, source, *common),
        ["checkpoint_6", "checkpoint_7"],
        position_saved,
    )


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


# --------------------------------------------------------------------------------------------------
# Extraction in shards


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


def test_evaluation_decodes_on_the_fly_in_workers(tmp_path, tiny_model, image_folder):
    import json as _json

    from stage1_vqvae.evaluate import main as evaluate

    tiny_model.save_pretrained(tmp_path / "vq")
    (tmp_path / "vq" / "data_config.json").write_text(_json.dumps({"source": str(image_folder), "resolution": 16}))
    in_memory = evaluate(["--model", str(tmp_path / "vq"), "--split", "test"])
    on_the_fly = evaluate(
        ["--model", str(tmp_path / "vq"), "--split", "test", "data.cache_max_gb=0", "--num_workers", "2"]
    )
    assert on_the_fly == in_memory  # the same images, whichever way they are read


# --------------------------------------------------------------------------------------------------
# One held-out carve, streamed or not, on any number of readers


def make_id_source(root, n: int, kind: str, n_files: int = 1):
    """A train-only source of n 8x8 images, each with its row id written in its first two pixels."""
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = []
    for i in range(n):
        a = np.zeros((8, 8), np.uint8)
        a[0, 0], a[0, 1] = i % 256, i // 256
        images.append(Image.fromarray(a, mode="L"))
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=feats)
    if kind == "disk":  # streamed as 16 shards
        datasets.DatasetDict({"train": ds}).save_to_disk(str(root))
    else:
        root.mkdir(parents=True)
        for f in range(n_files):
            ds.shard(n_files, f, contiguous=True).to_parquet(str(root / f"train-{f:05d}-of-{n_files:05d}.parquet"))
    return root


def row_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def streamed_epoch(cfg: DataConfig, world: int, workers: int, batch: int = 4) -> set[int]:
    """The row ids every rank x worker trains on in one epoch of the stream."""
    seen = set()
    for rank in range(world):
        train = load_splits(cfg, splits=("train",))["train"].configure(batch, rank, world)
        done = set()
        for b in torch.utils.data.DataLoader(train, batch_size=None, num_workers=workers):
            if b["position"]["epoch"] >= 1:
                done.add(b["position"]["worker"])
                if len(done) == max(1, workers):
                    break
                continue
            seen.update(row_ids(b["images"]))
    return seen


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


@pytest.mark.parametrize("cache_max_gb, trims", [(0.0, 20), (1.0, 0)])
def test_training_hands_freed_memory_back_only_when_decoding_on_the_fly(tmp_path, image_folder, monkeypatch,
                                                                        cache_max_gb, trims):  # fmt: skip
    # On the fly the heap creeps with the batches (fragmentation) and a trim now and then keeps the peak flat
    # (here after every micro-batch: the interval is 0); in memory a trim would make the next steps fault their
    # pages in again (-22% img/s on the demo when done every step), so none runs.
    import stage1_vqvae.train as train

    calls = []
    monkeypatch.setattr(train, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(train, "TRIM_INTERVAL_S", 0.0)
    main(stage1_args(tmp_path / "o", image_folder, "train.max_steps=20", "train.checkpoint_every=0",
                     f"data.cache_max_gb={cache_max_gb}"))  # fmt: skip
    assert len(calls) == trims
