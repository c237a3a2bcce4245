"""Stage-2 training (resume, two processes, fingerprints), evaluation, export and sample.py end to end."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from stage1_vqvae.data import DataConfig
from stage1_vqvae.extract import extract
from vqgen.cli import VqgenError

from helpers import ROOT, TINY1, TINY2, resumed_equals_uninterrupted, run_two_processes


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, image_folder):
    """A tiny trained VQ-VAE folder (with data_config.json) and its extracted codes."""
    from stage1_vqvae.train import main as train1

    root = tmp_path_factory.mktemp("pipe")
    model_dir = train1(
        [
            "--config",
            TINY1,
            f"train.output_dir={root / 's1'}",
            f"data.source={image_folder}",
            "data.max_samples=null",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.eval_every=0",
            "train.checkpoint_every=0",
        ]
    )
    from stage1_vqvae.model import VQVAE

    codes = extract(
        VQVAE.from_pretrained(model_dir),
        DataConfig(source=str(image_folder), resolution=16, resize_mode="stretch"),
        root / "codes",
        model_location=str(model_dir),
    )
    return root, model_dir, codes


def train2(out, codes, *extra):
    from stage2_prior.train import main

    return main(["--config", TINY2, f"train.output_dir={out}", f"data.codes={codes}", *extra])


def test_training_resume_reproduces_the_uninterrupted_run(stage1, tmp_path):
    _, _, codes = stage1
    common = ["train.max_steps=5", "train.checkpoint_every=2", "train.checkpoints_total_limit=5"]
    common += ["model.dropout=0.1"]  # global-RNG draws at every step must continue exactly after the resume
    full = train2(tmp_path / "a", codes, *common)
    train2(tmp_path / "b", codes, *common)
    for name in ("checkpoint_4", "checkpoint_5"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "b" / "model")
    resumed = train2(tmp_path / "b", codes, *common, "--resume_from_checkpoint", "latest")
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "b" / "train_summary.json").read_text())["steps"] == 5
    assert (full / "samples.png").is_file()  # the VQ-VAE was found and a sample grid decoded


def test_resuming_on_codes_of_another_vqvae_is_refused(stage1, tmp_path):
    _, _, codes = stage1
    train2(tmp_path / "a", codes, "train.max_steps=2", "train.checkpoint_every=2")
    other = tmp_path / "other_codes"
    shutil.copytree(codes, other)
    meta = json.loads((other / "vqgen_codes.json").read_text())
    meta["vqvae_fingerprint"] = "0" * 64
    (other / "vqgen_codes.json").write_text(json.dumps(meta))
    with pytest.raises(VqgenError, match="fingerprints differ"):
        train2(tmp_path / "a", other, "train.max_steps=4", "--resume_from_checkpoint", "latest")


@pytest.mark.slow
def test_two_processes_match_one_process(stage1, tmp_path, image_folder):
    from stage1_vqvae.model import VQVAE

    _, vqvae_dir, _ = stage1
    # 3 validation sequences: 2 ranks pad them to 4, and validation must count each once.
    data = DataConfig(source=str(image_folder), resolution=16, resize_mode="stretch", validation_fraction=0.125)
    codes = extract(VQVAE.from_pretrained(vqvae_dir), data, tmp_path / "codes", model_location=str(vqvae_dir))
    # Sample grids on: every rank samples (as FSDP needs), the main process writes the grid.
    args = ["train.max_steps=3", "train.checkpoint_every=0", "model.class_dropout=0.0"]
    one = train2(tmp_path / "one", codes, *args)
    proc = run_two_processes(
        "stage2_prior.train",
        "--config",
        TINY2,
        f"train.output_dir={tmp_path / 'two'}",
        f"data.codes={codes}",
        *args,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["num_processes"] == 2
    assert (tmp_path / "two" / "model" / "samples.png").is_file()
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["validation"]["num_sequences"] == 3
    a, b = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


def test_evaluate_export_and_sample_end_to_end(stage1, tmp_path):
    from sample import main as sample
    from stage2_prior.evaluate import main as evaluate
    from stage2_prior.export import main as export
    from stage2_prior.pipeline import VQGenPipeline

    _, vqvae_dir, codes = stage1
    prior = train2(tmp_path / "s2", codes, "train.max_steps=3", "train.checkpoint_every=0")
    r = evaluate(["--prior", str(prior), "--split", "test", "--output_dir", str(tmp_path / "m")])
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == r
    assert r["uniform_bits_per_code"] == 4.0 and 0 < r["bits_per_code"] < 6
    assert r["two_stage"]["num_images"] == 8 and r["two_stage"]["bits_per_dim"] > 0
    pipe = export(["--vqvae", str(vqvae_dir), "--prior", str(prior), "--output_dir", str(tmp_path / "pipe")])
    assert VQGenPipeline.from_pretrained(pipe).class_names == ["a", "b"]

    out = sample(["--pipeline", str(pipe), "--per_class", "3", "--seed", "5", "--output_dir", str(tmp_path / "o1")])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i:05d}_class{c}.png" for i, c in enumerate("aaabbb")] + ["grid.png", "samples.json"])
    info = json.loads((out / "samples.json").read_text())
    assert info["seed"] == 5 and info["classes"] == [0, 0, 0, 1, 1, 1] and len(info["vqvae_fingerprint"]) == 64
    again = sample(
        [
            "--vqvae",
            str(vqvae_dir),
            "--prior",
            str(prior),
            "--per_class",
            "3",
            "--seed",
            "5",
            "--output_dir",
            str(tmp_path / "o2"),
        ]
    )
    for n in names:
        if n.endswith(".png"):
            assert (out / n).read_bytes() == (again / n).read_bytes(), n  # same seed, same images
    # ... for the same decoding, window and batch size, which samples.json records with the rule.
    assert info["decoding"] == "sequential" and info["jacobi_window"] is None  # --batch_size 100
    assert "decoding, jacobi_window, batch_size and device" in info["same_images_with"]
    one = sample(["--pipeline", str(pipe), "--per_class", "3", "--seed", "5", "--batch_size", "1",
                  "--output_dir", str(tmp_path / "o1b")])  # fmt: skip
    one_info = json.loads((one / "samples.json").read_text())
    assert one_info["decoding"] == "jacobi" and one_info["jacobi_window"] == 8
    guided = sample(
        ["--pipeline", str(pipe), "--classes", "b,a,1", "--guidance_scale", "3", "--output_dir", str(tmp_path / "o3")]
    )
    assert json.loads((guided / "samples.json").read_text())["classes"] == [1, 0, 1]
    unc = sample(["--pipeline", str(pipe), "--num_images", "4", "--output_dir", str(tmp_path / "o4")])
    assert sorted(p.name for p in unc.glob("0*.png")) == [f"{i:05d}.png" for i in range(4)]
    comp = sample(
        [
            "--pipeline",
            str(pipe),
            "--complete",
            str(out / "00000_classa.png"),
            "--keep_rows",
            "2",
            "--num_images",
            "3",
            "--output_dir",
            str(tmp_path / "o5"),
        ]
    )
    assert (comp / "completion.png").is_file()
    half = sample(  # no --keep_rows: half of the code rows are kept
        ["--pipeline", str(pipe), "--complete", str(out / "00000_classa.png"), "--num_images", "2", "--seed", "3",
         "--output_dir", str(tmp_path / "o5b")]
    )  # fmt: skip
    assert (half / "completion.png").is_file()
    from types import SimpleNamespace

    from sample import completion_prefix

    loaded = VQGenPipeline.from_pretrained(pipe)
    own, prefix = completion_prefix(SimpleNamespace(complete=str(out / "00000_classa.png"), keep_rows=None), loaded, 2)
    assert prefix.shape == (2, 2 * 4) and torch.equal(prefix[0], own.reshape(-1)[:8])  # 2 of the 4 code rows
    # The per-class grid carries the class names in a left margin: wider than the bare grid of 3 images.
    from PIL import Image

    assert Image.open(out / "grid.png").width > 3 * 16 + 4 * 2

    with pytest.raises(VqgenError, match="already holds files"):
        sample(["--pipeline", str(pipe), "--output_dir", str(out)])
    with pytest.raises(VqgenError, match="not a class"):
        sample(["--pipeline", str(pipe), "--classes", "zebra", "--output_dir", str(tmp_path / "o6")])
    with pytest.raises(VqgenError, match="no such folder"):
        sample(["--vqvae", str(tmp_path / "missing"), "--prior", str(prior), "--output_dir", str(tmp_path / "o7")])
    with pytest.raises(VqgenError, match="Hub could not be reached"):
        sample(["--pipeline", "nobody/no-pipeline", "--output_dir", str(tmp_path / "o8")])


def test_sampling_with_a_mismatching_vqvae_fails_clearly(stage1, tmp_path, tiny_model):
    from sample import main as sample

    _, _, codes = stage1
    prior = train2(tmp_path / "s2", codes, "train.max_steps=1", "train.checkpoint_every=0")
    tiny_model.save_pretrained(tmp_path / "other_vqvae")
    with pytest.raises(VqgenError, match="fingerprints differ"):
        sample(["--vqvae", str(tmp_path / "other_vqvae"), "--prior", str(prior), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_cli_errors_print_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "sample.py"),
            "--pipeline",
            str(tmp_path / "nope"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_trained_prior_is_pushed_with_its_card_and_loads_back(stage1, tmp_path, fake_hub):
    from stage2_prior.model import layout_of, load_prior

    _, _, codes = stage1
    prior = train2(
        tmp_path / "s2",
        codes,
        "train.max_steps=2",
        "train.checkpoint_every=0",
        "--push_to_hub",
        "--hub_model_id",
        "me/prior",
    )
    remote = tmp_path / "remote" / "model" / "me" / "prior"
    card = (remote / "README.md").read_text()
    assert "pipeline_tag: unconditional-image-generation" in card and "bits per code" in card
    assert "samples.png" in card and (remote / "samples.png").is_file()
    assert layout_of(load_prior(str(remote))) == layout_of(load_prior(str(prior)))


def test_the_two_stage_bound_scores_the_images_the_codes_were_extracted_from(stage1, tmp_path, image_folder):
    from stage1_vqvae.model import VQVAE
    from stage2_prior.evaluate import main as evaluate

    _, vqvae_dir, _ = stage1
    other = tmp_path / "other_images"
    shutil.copytree(image_folder, other)
    for extra in sorted((other / "test").rglob("*.png"))[:3]:
        extra.unlink()  # 5 test images here, 8 in the VQ-VAE's training folder
    codes = extract(
        VQVAE.from_pretrained(vqvae_dir),
        DataConfig(source=str(other), resolution=16, resize_mode="stretch"),
        tmp_path / "codes",
        model_location=str(vqvae_dir),
    )
    prior = train2(tmp_path / "s2", codes, "train.max_steps=1", "train.checkpoint_every=0")
    result = evaluate(["--prior", str(prior), "--split", "test"])
    assert result["num_sequences"] == 5 and result["two_stage"]["num_images"] == 5


def test_the_pipeline_object_samples_saves_loads_and_pushes(stage1, tmp_path, fake_hub, caplog):
    from PIL import Image

    from stage1_vqvae.model import VQVAE
    from stage2_prior.model import load_prior
    from stage2_prior.pipeline import VQGenPipeline

    _, vqvae_dir, codes = stage1
    prior = train2(tmp_path / "s2", codes, "train.max_steps=2", "train.checkpoint_every=0")
    pipe = VQGenPipeline(VQVAE.from_pretrained(vqvae_dir), load_prior(prior))
    out = pipe(classes=["a", 1, "b"], generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out.images] == [(16, 16)] * 3 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.classes.tolist() == [0, 1, 1] and out.codes.shape == (3, 4, 4)
    pt = pipe(classes=["a", 1, "b"], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert pt.images.shape == (3, 1, 16, 16) and 0 <= pt.images.min() and pt.images.max() <= 1
    assert torch.equal(pt.codes, out.codes)  # same seed, same samples
    pil_pixels = torch.tensor([list(im.getdata()) for im in out.images]).view(3, 1, 16, 16)
    assert torch.equal(pil_pixels, pt.images.mul(255).round().byte())
    with caplog.at_level("WARNING"):
        assert pipe(num_images=2, guidance_scale=3.0, output_type="pt").images.shape[0] == 2
    assert "ignored" in caplog.text  # guidance needs a class: said, not silently dropped

    folder = pipe.save_pretrained(tmp_path / "pipe")
    assert {"vqvae", "prior", "pipeline.json", "README.md", "samples.png"} <= {p.name for p in folder.iterdir()}
    assert (folder / "vqvae" / "data_config.json").is_file()
    again = VQGenPipeline.from_pretrained(folder)
    assert torch.equal(again(classes=[0, 1, 1], generator=torch.Generator().manual_seed(0)).codes, out.codes)
    pipe.push_to_hub("me/pipe", api=fake_hub())
    remote = tmp_path / "remote" / "model" / "me" / "pipe"
    assert "me/pipe" in (remote / "README.md").read_text()
    assert VQGenPipeline.from_pretrained(remote).vqvae_fingerprint == pipe.vqvae_fingerprint


def test_training_on_memory_mapped_codes_equals_training_on_codes_in_memory(stage1, tmp_path):
    from stage2_prior.data import CodeDataConfig, MappedCodeSequences, load_code_splits

    _, _, codes = stage1
    mapped, _, _ = load_code_splits(CodeDataConfig(codes=str(codes), cache_max_gb=0))
    in_memory, _, _ = load_code_splits(CodeDataConfig(codes=str(codes)))
    assert all(isinstance(v, MappedCodeSequences) for v in mapped.values())
    for split in in_memory:
        assert torch.equal(mapped[split].input_ids, in_memory[split].input_ids)
    common = ["train.max_steps=3", "train.checkpoint_every=0", "model.dropout=0.1"]
    a = train2(tmp_path / "a", codes, *common)
    b = train2(tmp_path / "b", codes, *common, "data.cache_max_gb=0")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_a_prior_trained_on_streamed_codes_resumes_bit_exact_without_a_shuffle_buffer(stage1, tmp_path):
    _, _, codes = stage1
    common = ["data.streaming=true", "data.shuffle_buffer=1", "train.max_steps=5", "train.checkpoint_every=2"]
    common += ["train.checkpoints_total_limit=5", "model.dropout=0.1"]
    resumed_equals_uninterrupted(
        lambda argv: train2(argv[0], codes, *argv[1:]),
        tmp_path / "a",
        tmp_path / "b",
        lambda out: [out, *common],
        ["checkpoint_4", "checkpoint_5"],
    )
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    # Streamed, the prior saw other batches than from memory (a shuffle buffer of 1 keeps the file order).
    in_memory = load_file(str(train2(tmp_path / "c", codes, *common[2:]) / "model.safetensors"))
    assert any(not torch.equal(a[k], in_memory[k]) for k in a)


def test_the_streamed_codes_are_shuffled_by_the_runs_seed(stage1, tmp_path, monkeypatch):
    import stage2_prior.train as train
    from stage2_prior.data import CodeDataConfig, load_code_splits

    _, _, codes = stage1
    cfg = CodeDataConfig(codes=str(codes), streaming=True, shuffle_buffer=64)

    def first_batches(seed):
        stream = load_code_splits(cfg, splits=("train",), seed=seed)[0]["train"].configure(4, 0, 1)
        it = iter(stream)
        return torch.cat([next(it)["input_ids"] for _ in range(3)])

    assert torch.equal(first_batches(3), first_batches(3)) and not torch.equal(first_batches(3), first_batches(4))
    seeds = []
    real = train.load_code_splits

    def spy(*args, **kwargs):
        splits, meta, layout = real(*args, **kwargs)
        seeds.append(splits["train"].seed)
        return splits, meta, layout

    monkeypatch.setattr(train, "load_code_splits", spy)
    train2(tmp_path / "run", codes, "data.streaming=true", "train.seed=7", "train.max_steps=1")
    assert seeds == [7]  # the trainer's stream follows train.seed (it was 0 whatever the seed)


def hub_as_local_files(remote, monkeypatch):
    """hf:// paths served from the fake Hub's folders (the network boundary datasets' streaming reads through)."""
    import importlib

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its read-only view)

    class HubFiles(LocalFileSystem):
        protocol = "hf"

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path).removeprefix("hf://")
            if path.startswith("datasets/"):
                path = str(remote / "dataset" / path.removeprefix("datasets/"))
            elif not path.startswith("/"):
                path = "/" + path  # a local path handed back as hf://tmp/... by unstrip_protocol
            return super()._strip_protocol(path)

    monkeypatch.setitem(registry._registry, "hf", HubFiles)
    monkeypatch.setattr(fsspec.AbstractFileSystem, "_cache", {}, raising=False)


def test_codes_published_to_the_hub_stream_without_a_download(stage1, tmp_path, fake_hub, monkeypatch):
    from stage1_vqvae.extract import publish_codes
    from stage2_prior.data import CodeDataConfig, StreamingCodes, load_code_splits
    from vqgen.codes import load_code_dataset

    _, _, codes = stage1
    publish_codes(codes, "me/codes")
    hub_as_local_files(tmp_path / "remote", monkeypatch)
    local, _, _ = load_code_splits(CodeDataConfig(codes=str(codes)))
    cfg = CodeDataConfig(codes="me/codes", streaming=True, shuffle_buffer=1, streaming_eval_rows=3)
    streamed, meta, _ = load_code_splits(cfg, splits=("train", "validation"))
    assert meta == load_code_dataset(codes)[1]
    assert torch.equal(streamed["validation"].input_ids, local["validation"].input_ids[:3])
    train = streamed["train"]
    assert isinstance(train, StreamingCodes)
    first = next(iter(train.configure(batch_size=4, rank=0, world=1)))["input_ids"]
    assert torch.equal(first, local["train"].input_ids[:4])  # one shard, no buffer: the file's order
    with pytest.raises(VqgenError, match="cannot read its vqgen_codes.json from the Hub"):
        load_code_splits(CodeDataConfig(codes="me/nothing", streaming=True))
