"""Stage-2 training: exact resume (in memory, memory-mapped, streamed), fingerprints, the seed, pushes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vqgen.cli import VqgenError

from helpers import (
    resumed_equals_uninterrupted,
    tiny_prior,
    train2,
)


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


def test_a_tied_copy_is_left_out_of_the_saved_weights_and_a_broken_tie_is_an_error():
    from stage2_prior.train import without_tied_copies

    prior = tiny_prior()
    gathered = {k: v.clone() for k, v in prior.state_dict().items()}  # separate tensors, as FSDP gathers them
    assert "lm_head.weight" in gathered
    assert without_tied_copies(prior, gathered).keys() == gathered.keys() - {"lm_head.weight"}
    gathered["lm_head.weight"] += 1
    with pytest.raises(RuntimeError, match="lm_head.weight no longer equals transformer.wte.weight"):
        without_tied_copies(prior, gathered)
