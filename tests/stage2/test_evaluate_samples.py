"""Sample metrics of any pipeline or folder: the figures equal torch-fidelity's on the same images, the real
reference is drawn like the samples, two processes draw and score the same samples as one, bad input is one
error before any work."""

import json

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image

from stage1_vqvae.data import DataConfig, ImageSplit
from stage1_vqvae.sources import load_source
from stage2_prior.evaluate_samples import main as evaluate_samples
from stage2_prior.references import draw_like
from vqgen.cli import VqgenError

from helpers import RGBImages, run_two_processes, sample_metrics_args


def write_folder(folder, images):
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    return folder


def test_a_folder_is_scored_exactly_as_torch_fidelity_scores_it(image_folder, inception_weights, tmp_path):
    rng = np.random.default_rng(0)
    fake = torch.from_numpy(rng.integers(0, 256, (12, 1, 16, 16), dtype=np.uint8))  # noise: far from the data
    folder = write_folder(tmp_path / "samples", fake)
    args = ["--samples", str(folder), f"data.source={image_folder}", "data.resolution=16", "data.channels=L",
            "--inception_weights", str(inception_weights), "--kid_subset_size", "8", "--reference_draws", "2",
            f"data.cache_dir={tmp_path / 'cache'}", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    got = evaluate_samples(args)
    cfg = DataConfig(source=str(image_folder), resolution=16, channels="L")
    real = ImageSplit(load_source(cfg)["test"], cfg).images  # (8, 1, 16, 16): the whole scored split
    want = torch_fidelity.calculate_metrics(
        input1=RGBImages(fake), input2=RGBImages(real), cuda=False, fid=True, kid=True, isc=True, prc=True,
        kid_subset_size=8, feature_extractor="inception-v3-compat", save_cpu_ram=True, verbose=False,
        feature_extractor_weights_path=str(inception_weights),
    )  # fmt: skip
    pairs = {"fid": "frechet_inception_distance", "kid": "kernel_inception_distance_mean",
             "inception_score": "inception_score_mean", "precision": "precision", "recall": "recall"}  # fmt: skip
    for ours, theirs in pairs.items():  # (precision/recall: the split has 8 < 12 images, so all of them)
        assert got[ours] == pytest.approx(want[theirs], rel=1e-4, abs=1e-9), ours
    # The real reference: 2 sets of 12 training images, scored the same way, far better than noise.
    assert got["fid_real_reference"]["draws"] == 2 and got["fid_real_reference"]["mean"] < got["fid"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["fid"] == got["fid"]
    with pytest.raises(VqgenError, match="--kid_subset_size 13 is more than the 12 samples"):  # the folder's count
        evaluate_samples([*args[: args.index("--kid_subset_size")], "--kid_subset_size", "13"])
    assert got["class_conditional"] is False and got["num_samples"] == 12


def test_split_train_scores_against_the_training_statistics_with_the_reference_from_test(inception_weights, tmp_path):
    # Audit 3, S4-14: published ImageNet FIDs (LlamaGen, VAR, ADM) compare with the training set's statistics;
    # --split train does, and the size-matched real reference is then drawn from test, which the statistics never saw.
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("validation", 2), ("test", 6)):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 128, (16, 16), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png"
                )
    fake = torch.from_numpy(rng.integers(128, 256, (10, 1, 16, 16), dtype=np.uint8))
    folder = write_folder(tmp_path / "samples", fake)
    args = ["--samples", str(folder), f"data.source={tmp_path / 'data'}", "data.resolution=16", "data.channels=L",
            "--inception_weights", str(inception_weights), "--kid_subset_size", "8", "--reference_draws", "1",
            "--split", "train", "--unconditional"]  # fmt: skip
    got = evaluate_samples(args)
    assert got["split"] == "train" and got["real_reference_split"] == "test"
    cfg = DataConfig(source=str(tmp_path / "data"), resolution=16, channels="L")
    train = ImageSplit(load_source(cfg)["train"], cfg).images  # (24, 1, 16, 16)
    want = torch_fidelity.calculate_metrics(
        input1=RGBImages(fake), input2=RGBImages(train), cuda=False, fid=True, verbose=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception_weights),
    )  # fmt: skip
    assert got["fid"] == pytest.approx(want["frechet_inception_distance"], rel=1e-4)


def test_reference_draws_take_the_samples_class_counts_and_refuse_what_the_split_cannot_give():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 3)
    asked = torch.tensor([0, 0, 0, 1, 1, 2])
    picks = draw_like(labels, asked, 6, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[picks], minlength=3).tolist() == [3, 2, 1] and len(set(picks.tolist())) == 6
    many = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    with pytest.raises(VqgenError, match="4 samples of class 2 asked, but the real images hold only 3"):
        draw_like(labels, many, 12, torch.Generator().manual_seed(0))
    fitted = draw_like(labels, many, 12, torch.Generator().manual_seed(0), fit=True)  # scaled to 3 per class
    assert torch.bincount(labels[fitted]).tolist() == [3, 3, 3]
    with pytest.raises(VqgenError, match="no labels"):
        draw_like(torch.full((9,), -1), asked, 6, torch.Generator())


@pytest.mark.slow
def test_two_processes_draw_and_score_the_same_samples_as_one(pipeline_dir, inception_weights, tmp_path):
    args = sample_metrics_args(pipeline_dir, inception_weights, 4, 6)
    one = evaluate_samples([*args, "--output_dir", str(tmp_path / "one"), "--update_card"])
    proc = run_two_processes("stage2_prior.evaluate_samples", *args, "--output_dir", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["class_conditional"] is True and one["num_samples"] == two["num_samples"] == 12
    for key in ("fid", "kid", "inception_score", "precision", "recall"):
        # The same images; features differ in the last bits with the thread count (1 per process here), which
        # KID's float32 difference of kernel sums (torch-fidelity's arithmetic) shows at 1e-5.
        rel = 1e-4 if key == "kid" else 1e-6
        assert two[key] == pytest.approx(one[key], rel=rel), key
        assert two[f"{key}_real_reference"]["mean"] == pytest.approx(one[f"{key}_real_reference"]["mean"], rel=rel)
    from huggingface_hub import ModelCard

    results = {r.metric_type: r.metric_value for r in ModelCard.load(pipeline_dir / "README.md").data.eval_results}
    assert results["fid"] == pytest.approx(one["fid"], rel=1e-5)


@pytest.mark.slow
def test_a_rank_that_draws_no_chunk_still_scores(pipeline_dir, inception_weights, tmp_path):
    # Audit 3, S4-7: with num_samples <= batch_size x (P - 1) rank 1 draws nothing, and its image shape stayed None
    # (a TypeError on that rank). One chunk of 12 here: rank 0 draws it all.
    args = sample_metrics_args(pipeline_dir, inception_weights, 12, 6, "--output_dir", str(tmp_path))
    proc = run_two_processes("stage2_prior.evaluate_samples", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == 12


def test_bad_input_is_one_error_before_any_sample_is_drawn(pipeline_dir, inception_weights, tmp_path, monkeypatch):
    w = ["--inception_weights", str(inception_weights)]
    with pytest.raises(VqgenError, match="at least 10"):
        evaluate_samples(["--pipeline", str(pipeline_dir), "--num_samples", "4", *w])
    with pytest.raises(VqgenError, match="not a multiple of the 2 classes; use 10"):
        evaluate_samples(["--pipeline", str(pipeline_dir), "--num_samples", "11", *w])
    with pytest.raises(VqgenError, match="--kid_subset_size 50 is more than the 12 samples"):
        evaluate_samples(["--pipeline", str(pipeline_dir), "--num_samples", "12", "--kid_subset_size", "50", *w])
    with pytest.raises(VqgenError, match=r"weights-inception-2015-12-05-6726825d\.pth.*downloads nothing"):
        evaluate_samples(["--pipeline", str(pipeline_dir), "--num_samples", "12", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(VqgenError, match="x.png is not a readable image"):
        evaluate_samples(["--samples", str(tmp_path / "bad"), *w])
    with pytest.raises(VqgenError, match="not both"):
        evaluate_samples(["--samples", str(tmp_path), "--pipeline", str(pipeline_dir), *w])


def test_images_of_another_size_or_channel_count_are_scored_with_one_warning_each(caplog):
    from stage2_prior.references import check_like

    with caplog.at_level("WARNING"):
        check_like((1, 16, 16), (1, 16, 16))
        assert caplog.text == ""
        check_like((3, 32, 32), (1, 16, 16))
    assert "32x32 and the reference images 16x16" in caplog.text and "3 channel(s)" in caplog.text


def test_the_demo_reports_the_standard_figures_or_the_line_that_says_what_is_missing(tmp_path, monkeypatch):
    from stage2_prior import demo

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    missing = demo.standard_figures(tmp_path, {}, 1000)
    assert missing.startswith("error: ") and "weights-inception-2015-12-05-6726825d.pth" in missing
    assert missing in demo.standard_table(missing)
    figures = {"fid": 12.5, "fid_real_reference": {"mean": 2.0, "std": 0.5}, "kid": 0.01, "inception_score": 2.2,
               "precision": 0.71, "recall": 0.42, "rfid": 3.25, "lpips": 0.125}  # fmt: skip
    table = demo.standard_table(figures).splitlines()
    assert table[-1] == "| 3.25 | 0.1250 | 12.50 | 2.00 +- 0.50 | 0.0100 | 2.20 | 0.71 | 0.42 |"
    assert table[0].startswith("| rFID (1000 test) | LPIPS (1000 test) | FID (vs 2000 test) |")


def test_the_demo_caps_its_inception_work_and_says_its_size_first(tmp_path, monkeypatch, capsys):
    # Audit 3, S4-8: with the Inception file in the hub cache the demo grew from 6 minutes to ~1 h 45 min (44k
    # forwards: full-split rFID in training and evaluation, FID against the whole test split), without a word.
    from stage2_prior import demo

    steps = []
    monkeypatch.setattr("vqgen.metrics.standard.find_weights", lambda *a: "found")
    monkeypatch.setattr(demo, "run_step", lambda name, args, t: steps.append([str(a) for a in args]))
    for name, figures in (("samples_inception", {"fid": 1.0}), ("stage1_inception", {"rfid": 2.0, "lpips": 0.1})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(figures))  # what the two steps write
    figures = demo.standard_figures(tmp_path, {}, 1000)
    assert figures["rfid"] == 2.0 and figures["fid"] == 1.0
    said = capsys.readouterr().out
    assert "about 6000 Inception-V3 forwards, 14 min at the 7 images/s" in said and "--inception off" in said
    rfid, fid = steps
    assert "data.max_samples=1000" in rfid and "data.max_samples=2000" in fid
    assert fid[fid.index("--reference_draws") + 1] == "1"
    # The full-split figures are off in the demo's training and stage-1 evaluation.
    args = demo.build_parser().parse_args([])
    commands = {name: [str(a) for a in argv] for name, argv in demo.pipeline_steps(tmp_path, args)}
    assert "metrics.standard=off" in commands["stage 1 training"]
    evaluation = commands["stage 1 evaluation"]
    assert evaluation[evaluation.index("--standard_metrics") + 1] == "off"
