"""rFID and LPIPS of a VQ-VAE against their reference implementations (torch-fidelity, lpips) on the whole split,
the same under two processes, the statistics cache, the weights-missing paths, and the figures in the card."""

import json

import pytest
import torch
import torch_fidelity
from huggingface_hub import ModelCard

from stage1_vqvae.data import DataConfig, ImageSplit, to_model_input
from stage1_vqvae.evaluate import main as evaluate
from stage1_vqvae.model import VQVAE
from stage1_vqvae.sources import load_source
from vqgen.cli import VqgenError

from helpers import RGBImages, lpips_reference, run_two_processes


def evaluate_args(model_dir, out, weights, backbone, lin, *extra):
    return [
        "--model", str(model_dir), "--split", "test", "--output_dir", str(out), "--standard_metrics", "on",
        "--inception_weights", str(weights), "--lpips_net", "vgg", "--lpips_backbone", backbone, "--lpips_weights", lin,
        *extra,
    ]  # fmt: skip


def test_rfid_and_lpips_equal_torch_fidelity_and_lpips_on_the_whole_split(stage1, inception_weights, tmp_path):
    _, model_dir, _ = stage1
    ref_lpips, backbone, lin = lpips_reference(tmp_path, "vgg")
    cache = tmp_path / "cache"
    args = evaluate_args(model_dir, tmp_path / "eval", inception_weights, backbone, lin, f"data.cache_dir={cache}")
    got = evaluate(args)

    model = VQVAE.from_pretrained(model_dir).eval()
    cfg = DataConfig(**model.data_config)
    originals = ImageSplit(load_source(cfg)["test"], cfg).images  # (8, 1, 16, 16) uint8
    with torch.no_grad():
        x = to_model_input(originals)
        recon = model.decode_codes(model.encode(x)).clamp(-1, 1)
        want_lpips = ref_lpips(x.expand(-1, 3, -1, -1), recon.expand(-1, 3, -1, -1)).mean().item()
    recon_u8 = ((recon + 1) * 127.5).round().to(torch.uint8)
    want = torch_fidelity.calculate_metrics(
        input1=RGBImages(recon_u8), input2=RGBImages(originals), cuda=False, fid=True, verbose=False, save_cpu_ram=True,
        feature_extractor_weights_path=str(inception_weights),
    )["frechet_inception_distance"]  # fmt: skip
    assert got["rfid"] == pytest.approx(want, rel=1e-4) and got["rfid"] > 0
    assert got["lpips"] == pytest.approx(want_lpips, rel=1e-4) and got["lpips"] > 0
    assert got["rfid_num_images"] == 8 == got["num_images"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["rfid"] == got["rfid"]

    # The originals' statistics are cached beside the data, keyed by the split and the extractor; a rerun uses them.
    (entry,) = (cache / "fidelity").glob("*.safetensors")
    assert got["inception_weights_sha256"][:16] in entry.name
    again = evaluate([*args, "--update_card"])
    assert again["rfid"] == pytest.approx(got["rfid"], rel=1e-9)
    card = ModelCard.load(model_dir / "README.md")
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("test", "rfid")] == pytest.approx(got["rfid"], rel=1e-5)
    assert results[("test", "lpips")] == pytest.approx(got["lpips"], rel=1e-5)
    assert ("validation", "psnr") in results  # the training run's own figures stay


def test_missing_weights_skip_under_auto_and_fail_under_on_before_anything_is_written(stage1, tmp_path, caplog):
    _, model_dir, _ = stage1
    base = ["--model", str(model_dir), "--split", "test"]
    with pytest.raises(VqgenError, match=r"weights-inception-2015-12-05-6726825d\.pth.*downloads nothing"):
        evaluate([*base, "--standard_metrics", "on", "--output_dir", str(tmp_path / "on")])
    assert not (tmp_path / "on").exists()
    r = evaluate([*base, "--output_dir", str(tmp_path / "auto")])
    assert "rfid" not in r and "lpips" not in r and r["psnr"] > 0
    with pytest.raises(VqgenError, match="LPIPS-alex cannot score 16x16 images.*vgg"):
        _, backbone, lin = lpips_reference(tmp_path, "alex")
        evaluate([*base, "--lpips_net", "alex", "--lpips_backbone", backbone, "--lpips_weights", lin])
    assert "FID/KID/IS not computed" in caplog.text and "LPIPS not computed" in caplog.text
    assert "rfid" not in evaluate([*base, "--standard_metrics", "off"])


@pytest.mark.slow
def test_two_processes_give_the_same_rfid_and_lpips_as_one(stage1, inception_weights, tmp_path):
    """The validation split's 3 images: 2 ranks pad the odd one, which must not count twice."""
    _, model_dir, _ = stage1
    _, backbone, lin = lpips_reference(tmp_path, "vgg")
    one = evaluate(
        evaluate_args(model_dir, tmp_path / "one", inception_weights, backbone, lin, "--split", "validation")
    )
    two_args = evaluate_args(model_dir, tmp_path / "two", inception_weights, backbone, lin, "--split", "validation")
    proc = run_two_processes("stage1_vqvae.evaluate", *two_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["num_images"] == one["num_images"] == two["rfid_num_images"] == 3
    for key in ("rfid", "lpips", "psnr"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
