"""The vqgan network against diffusers' own VQModel: the same outputs at the same weights, an exported folder that
VQModel loads and that gives vqgen's codes and images, a bit-exact way back, refusals, and every stage-1 step."""

import json

import pytest
import torch
from diffusers import VQModel
from diffusers.models.attention_processor import Attention

from stage1_vqvae.export_diffusers import export, vqmodel_state
from stage1_vqvae.export_diffusers import main as export_main
from stage1_vqvae.model import VQVAE, VQVAEConfig
from stage1_vqvae.train import main as train
from stage1_vqvae.vqgan import vqmodel_config
from vqgen.cli import VqgenError

from helpers import VQGAN_ARGS, resumed_equals_uninterrupted, stage1_args, train2, weights


def tiny_config(**options) -> VQVAEConfig:
    # Three levels (16, 8, 4 px), attention at 8 and 4 px and in the middle blocks.
    return VQVAEConfig(
        in_channels=3, image_size=16, arch="vqgan", block_out_channels=[16, 16, 32], downsample=4, codebook_size=32,
        codebook_dim=8, latent_channels=8, norm_num_groups=8, layers_per_block=1, attn_resolutions=[8, 4], **options,
    )  # fmt: skip


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1  # smooth images: codes with some structure
    noise = 0.1 * torch.randn(n, 3, 16, 16, generator=g)
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear") + noise  # (n, 3, 16, 16)


def test_the_vqgan_network_computes_what_diffusers_vqmodel_computes_at_the_same_weights():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = VQVAE(cfg).eval()
    with torch.no_grad():  # norms and biases away from their init too, so that every tensor's place matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference = VQModel(**{**vqmodel_config(cfg, cfg.codebook_dim), "lookup_from_codebook": False}).eval()
    reference.load_state_dict(vqmodel_state(model), strict=True)
    # One attention per residual block at 8 and 4 px (1 in the encoder, 2 in the decoder) and one per middle block.
    assert sum(isinstance(m, Attention) for m in model.encoder.modules()) == 3
    assert sum(isinstance(m, Attention) for m in model.decoder.modules()) == 5
    x = images()
    with torch.no_grad():
        z_e = model.encoder(x)  # (8, 8, 4, 4)
        torch.testing.assert_close(reference.encode(x).latents, z_e, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            reference.decode(z_e, force_not_quantize=True).sample, model.decoder(z_e), atol=1e-6, rtol=0
        )


OPTIONS = {
    "ema-kmeans-restarts": dict(kmeans_init=True, dead_code_window=1),
    "codebook-loss": dict(decay=None),
    "rotation-trick": dict(straight_through="rotation"),
    "low-dim": dict(lookup_dim=4),
    "cosine": dict(l2_normalize=True),
    "low-dim-cosine": dict(lookup_dim=4, l2_normalize=True),
    "simvq": dict(decay=None, codebook_transform="linear"),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_an_exported_folder_gives_vqgens_codes_and_images_in_diffusers_and_loads_back_bit_for_bit(name, tmp_path):
    torch.manual_seed(0)
    model = VQVAE(tiny_config(**OPTIONS[name]))
    model.data_config = {"resolution": 16, "channels": "RGB"}
    for seed in range(3):  # EMA, k-means init and restarts at work: the statistics are not the initial ones
        model(images(seed=seed))
    model.eval()
    out = export(model, tmp_path / "vq", source="test")
    assert json.loads((out / "config.json").read_text())["_class_name"] == "VQModel"

    vq = VQModel.from_pretrained(out).eval()
    x = images(32, seed=7)
    with torch.no_grad():
        ours = model.encode(x)  # (32, 4, 4)
        _, _, (_, _, theirs) = vq.quantize(vq.encode(x).latents)
        theirs = theirs.view(32, 4, 4)
        # Exactly the same codes but at near-ties: VQModel's cdist and vqgen's addmm round differently, and a
        # folded projection or a cosine lookup compares in other floats. A flip must be a tie to ~1e-5.
        flips = (ours != theirs).nonzero(as_tuple=True)
        assert len(flips[0]) <= 0.01 * ours.numel(), f"{len(flips[0])} of {ours.numel()} codes differ"
        if len(flips[0]):
            lookup = model.quantizer.to_lookup(model.encoder(x).permute(0, 2, 3, 1)[flips])  # (n, d)
            book = model.quantizer.codebook()
            gap = (lookup - book[theirs[flips]]).norm(dim=1) - (lookup - book[ours[flips]]).norm(dim=1)
            assert gap.abs().max() < 1e-5
        d = model.quantizer.lookup_dim
        decoded = vq.decode(ours.flatten(), force_not_quantize=True, shape=(32, 4, 4, d)).sample
        torch.testing.assert_close(decoded, model.decode_codes(ours), atol=1e-5, rtol=0)

    back = VQVAE.from_pretrained(out)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.config == model.config and back.data_config == model.data_config


def test_fsq_and_the_papers_network_are_refused_with_one_line_and_nothing_written(tmp_path):
    fsq = VQVAE(tiny_config(quantizer="fsq", fsq_levels=[4, 4, 2], decay=None))
    with pytest.raises(VqgenError, match="quantizer fsq cannot be exported to diffusers: FSQ .* has no codebook"):
        export(fsq, tmp_path / "fsq")
    paper = VQVAE(VQVAEConfig())
    with pytest.raises(VqgenError, match="arch vqvae .* train one with model.arch=vqgan"):
        export(paper, tmp_path / "paper")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.downsample=8", "block_out_channels has 3 levels, so the vqgan network downsamples by 4, but down"),
        ("model.norm_num_groups=12", "norm_num_groups 12 does not divide every block_out_channels"),
        ("model.attn_resolutions=[2]", r"attn_resolutions \[2\] are not level sizes of this network"),
        ("data.resolution=18", "image_size 18 .* is not divisible by downsample 4"),
    ],
)
def test_a_network_the_config_cannot_build_stops_at_the_start_with_one_line(tmp_path, image_folder, override, message):
    with pytest.raises(VqgenError, match=message):
        train(stage1_args(tmp_path / "run", image_folder, *VQGAN_ARGS, override))
    assert not (tmp_path / "run").exists()


def test_a_resumed_vqgan_run_with_restarts_and_the_gan_losses_equals_the_uninterrupted_one(
    tmp_path, image_folder, vgg16_file
):
    vgg, _ = vgg16_file
    common = [*VQGAN_ARGS, "train.max_steps=7", "train.checkpoint_every=3", "train.checkpoints_total_limit=5"]
    common += ["model.dead_code_window=2", "model.kmeans_init=true"]
    common += ["loss.adversarial_weight=0.5", "loss.disc_start=2", "loss.disc_layers=2", "loss.disc_channels=8"]
    common += ["loss.perceptual_weight=1.0", f"loss.perceptual_weights={vgg}"]
    full, _ = resumed_equals_uninterrupted(
        train, tmp_path / "a", tmp_path / "b", lambda out: stage1_args(out, image_folder, *common),
        ["checkpoint_6", "checkpoint_7"],
    )  # fmt: skip
    assert weights(full)["quantizer.code_age"].max() < 7  # restarts fired (ages reset)


def test_a_trained_vqgan_stage1_exports_and_its_export_evaluates_extracts_and_samples(tmp_path, image_folder, fake_hub):
    from accelerate.state import AcceleratorState

    from sample import main as sample
    from stage1_vqvae.evaluate import main as evaluate
    from stage1_vqvae.extract import main as extract

    args = [*VQGAN_ARGS, "train.max_steps=4", "train.checkpoint_every=0", "model.lookup_dim=4"]
    AcceleratorState._reset_state(True)  # this run sets its own precision: bf16 autocast around the vqgan network
    try:
        model_dir = train(stage1_args(tmp_path / "run", image_folder, *args, "model.l2_normalize=true",
                                      "train.mixed_precision=bf16"))  # fmt: skip
    finally:
        AcceleratorState._reset_state(True)
    assert "export_diffusers" in (model_dir / "README.md").read_text()
    out = export_main(["--model", str(model_dir), "--output_dir", str(tmp_path / "vq")])
    assert "vq.quantize(latents)" in (out / "README.md").read_text()  # the card says how to get codes out
    with pytest.raises(VqgenError, match="already exists"):
        export_main(["--model", str(model_dir), "--output_dir", str(out)])
    export_main(["--model", str(out), "--output_dir", str(tmp_path / "again"), "--push_to_hub", "--hub_model_id=me/vq"])
    remote = tmp_path / "remote" / "model" / "me" / "vq"
    assert 'VQModel.from_pretrained("me/vq")' in (remote / "README.md").read_text()
    assert VQModel.from_pretrained(remote).config.num_vq_embeddings == 16

    trained, exported = weights(model_dir), VQVAE.from_pretrained(out).state_dict()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    scored = [evaluate(["--model", str(m), "--split", "test", "--standard_metrics", "off"]) for m in (model_dir, out)]
    assert scored[0] == scored[1] and scored[0]["psnr"] > 0
    codes = extract(["--model", str(out), "--output_dir", str(tmp_path / "codes")])
    prior = train2(tmp_path / "s2", codes, "train.max_steps=2", "train.checkpoint_every=0")
    samples = sample(
        ["--vqvae", str(out), "--prior", str(prior), "--num_images", "2", f"--output_dir={tmp_path / 's'}"]
    )
    assert len(list(samples.glob("*.png"))) >= 2
