"""Pretrained tokenizers as vqgen's stage 1: diffusers VQModels (with and without attention, the
lookup_from_codebook layout, a [0, 1] pixel range) give their own codes and images through vqgen; refusals."""

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import VQModel

from stage1_vqvae.import_tokenizer import main as import_tokenizer
from stage1_vqvae.model import VQVAE
from vqgen.cli import VqgenError

LAYOUTS = {
    "attention": dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                      up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]),
    "no-attention": dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         mid_block_add_attention=False),
    "lookup-from-codebook": dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                 lookup_from_codebook=True, vq_embed_dim=4),
}  # fmt: skip


def tiny_vqmodel(folder, seed=0, **layout) -> VQModel:
    torch.manual_seed(seed)
    vq = VQModel(
        in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1, latent_channels=8,
        num_vq_embeddings=32, norm_num_groups=8, sample_size=16, **layout,
    ).eval()  # fmt: skip
    with torch.no_grad():  # away from the init, norms included, so that every tensor's place matters
        for p in vq.parameters():
            p.add_(0.1 * torch.randn_like(p))
    vq.save_pretrained(folder)
    return vq


def images(n=16, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")  # (n, 3, 16, 16) in [-1, 1]


@pytest.mark.parametrize("pixel_range", ["-1,1", "0,1"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_imported_vqmodel_gives_its_own_codes_and_decodings(tmp_path, layout, pixel_range):
    vq = tiny_vqmodel(tmp_path / "vq", **LAYOUTS[layout])
    out = import_tokenizer([str(tmp_path / "vq"), "--output_dir", str(tmp_path / "s1"), f"--pixel_range={pixel_range}"])
    model = VQVAE.from_pretrained(out)
    x = images()  # vqgen's [-1, 1]
    theirs_in = x if pixel_range == "-1,1" else (x + 1) / 2  # what the tokenizer was trained to take
    with torch.no_grad():
        latents = vq.encode(theirs_in).latents
        _, _, (_, _, theirs) = vq.quantize(latents)
        ours = model.encode(x)  # (16, 8, 8)
        assert torch.equal(ours.flatten(), theirs)  # (every one of 1024 codes; no near-tie on these weights)
        d = model.config.codebook_dim
        if vq.config.lookup_from_codebook:  # this layout's decode takes the indices
            decoded = vq.decode(theirs, force_not_quantize=True, shape=(16, 8, 8, d)).sample
        else:  # the others' take the code vectors
            z_q = vq.quantize.get_codebook_entry(theirs, (16, 8, 8, d))  # (16, d, 8, 8)
            decoded = vq.decode(z_q, force_not_quantize=True).sample
        ours_decoded = model.decode_codes(ours)  # in vqgen's [-1, 1]: compared in the tokenizer's own range
        torch.testing.assert_close(ours_decoded if pixel_range == "-1,1" else (ours_decoded + 1) / 2, decoded,
                                   atol=1e-5, rtol=0)  # fmt: skip
    source = json.loads((out / "tokenizer_source.json").read_text())
    assert source["weights_file"] == "diffusion_pytorch_model.safetensors" and len(source["weights_sha256"]) == 64
    assert "Frozen" in (out / "README.md").read_text() and model.config.pixel_range == [
        float(v) for v in pixel_range.split(",")
    ]


def test_an_unknown_range_a_spatial_norm_and_a_pickle_that_runs_code_are_refused_with_nothing_written(tmp_path):
    tiny_vqmodel(tmp_path / "vq", **LAYOUTS["no-attention"])
    with pytest.raises(VqgenError, match="pixel range .* is not known to vqgen: pass --pixel_range"):
        import_tokenizer([str(tmp_path / "vq"), "--output_dir", str(tmp_path / "a")])
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    (tmp_path / "movq").mkdir()
    (tmp_path / "movq" / "config.json").write_text(json.dumps({**config, "norm_type": "spatial"}))
    with pytest.raises(VqgenError, match="norm_type 'spatial' .* only norm_type 'group' VQModels can be imported"):
        import_tokenizer([str(tmp_path / "movq"), "--output_dir", str(tmp_path / "b"), "--pixel_range=-1,1"])
    for change, message in (
        ({"down_block_types": ["DownEncoderBlock2D"]}, "lists 1 down and 2 up block types for 2 block_out_channels"),
        ({"up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}, "attention at other levels in the encoder"),
    ):
        (tmp_path / "movq" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(VqgenError, match=message):
            import_tokenizer([str(tmp_path / "movq"), "--output_dir", str(tmp_path / "b"), "--pixel_range=-1,1"])

    class RunsCode:  # a pickle whose loading would call os.system
        def __reduce__(self):
            import os

            return os.system, (f"touch {tmp_path / 'ran'}",)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    torch.save({"x": RunsCode()}, tmp_path / "bad" / "diffusion_pytorch_model.bin")
    with pytest.raises(VqgenError, match="holds more than tensors .* re-save it as safetensors"):
        import_tokenizer([str(tmp_path / "bad"), "--output_dir", str(tmp_path / "c"), "--pixel_range=-1,1"])
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "movq", "vq"]  # nothing half-written


def test_an_imported_tokenizer_runs_the_whole_pipeline_and_the_cards_name_its_source(tmp_path, image_folder):
    from sample import main as sample
    from stage1_vqvae.extract import main as extract
    from stage2_prior.export import main as export
    from stage2_prior.pipeline import VQGenPipeline

    from helpers import train2

    layout = dict(LAYOUTS["attention"], in_channels=1, out_channels=1)
    torch.manual_seed(0)
    VQModel(block_out_channels=[16, 32], layers_per_block=1, latent_channels=8, num_vq_embeddings=32,
            norm_num_groups=8, sample_size=16, **layout).save_pretrained(tmp_path / "vq")  # fmt: skip
    s1 = import_tokenizer([str(tmp_path / "vq"), "--output_dir", str(tmp_path / "s1"), "--pixel_range=-1,1"])
    with pytest.raises(VqgenError, match="records no image source .* pass data.source="):
        extract(["--model", str(s1), "--output_dir", str(tmp_path / "nocodes")])
    codes = extract(["--model", str(s1), "--output_dir", str(tmp_path / "codes"), f"data.source={image_folder}"])
    source = json.loads((codes / "vqgen_codes.json").read_text())["tokenizer_source"]  # the chain reaches the file
    assert (
        source["weights_sha256"] == hashlib.sha256((tmp_path / "vq" / source["weights_file"]).read_bytes()).hexdigest()
    )
    prior = train2(tmp_path / "s2", codes, "train.max_steps=2", "train.checkpoint_every=0")
    pipe = export(["--vqvae", str(s1), "--prior", str(prior), "--output_dir", str(tmp_path / "pipe")])
    assert f"Imported from `{tmp_path / 'vq'}`" in (pipe / "README.md").read_text()
    assert (pipe / "vqvae" / "tokenizer_source.json").is_file()
    samples = sample(["--pipeline", str(pipe), "--per_class=1", f"--output_dir={tmp_path / 'samples'}"])
    assert len(list(samples.glob("*.png"))) >= 2
    assert VQGenPipeline.from_pretrained(pipe).vqvae.tokenizer_source["kind"] == "diffusers.VQModel"
    from stage2_prior.app import load_model  # gradio: the dev extra

    app = load_model(str(pipe), device="cpu")  # the page's Generate button, without the browser
    drawn, record = app.generate("b", 2, app.settings(1.0, 1.0, 0, 1.0), seed=0)
    assert len(drawn) == 2 and drawn[0].size == (16, 16) and "sample.py" in record["sample_py"]


class Callback:  # a class of the training code, which the importer does not have: read as an inert placeholder
    def __init__(self):
        self.monitor = "val/rec_loss"


class CallsShell:  # what loading would run: refused before it is called
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


DDCONFIG = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[8], dropout=0.0)  # fmt: skip


def taming_checkpoint(folder, ema: bool = False):
    """taming's own modules with random weights, saved as Lightning saves a VQGAN (state_dict with the losses'
    tensors, and non-tensor objects beside it); its config YAML as taming writes it."""
    import argparse

    import taming.modules.diffusionmodules.model as modules  # make install adds it (--no-deps), as a reference only
    import yaml
    from taming.modules.vqvae.quantize import VectorQuantizer2

    torch.manual_seed(0)
    parts = dict(
        encoder=modules.Encoder(**DDCONFIG), decoder=modules.Decoder(**DDCONFIG),
        quantize=VectorQuantizer2(32, 4, 0.25), quant_conv=torch.nn.Conv2d(8, 4, 1),
        post_quant_conv=torch.nn.Conv2d(4, 8, 1),
    )  # fmt: skip
    state = {}
    with torch.no_grad():
        for name, module in parts.items():
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p))
            state.update({f"{name}.{k}": v.clone() for k, v in module.state_dict().items()})
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)  # training-only: dropped
    if ema:  # latent-diffusion's LitEma: each parameter under its name without dots
        state.update({"model_ema." + k.replace(".", ""): v + 0.5 for k, v in state.items() if not k.startswith("loss")})
        state["model_ema.decay"] = torch.tensor(0.9999)
    folder.mkdir()
    others = {
        "epoch": 3,
        "hyper_parameters": argparse.Namespace(lr=1e-4),
        "callbacks": {"ckpt": Callback()},
        "best_score": np.float64(0.25),
        "scores": np.arange(3.0),
    }  # what Lightning keeps beside the weights
    torch.save({"state_dict": state, **others}, folder / "last.ckpt")
    config = {
        "model": {
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": 4,
                "n_embed": 32,
                "ddconfig": DDCONFIG,
                "lossconfig": {"target": "taming.modules.losses.X"},
            },
        }
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(config))
    return {k: m.eval() for k, m in parts.items()}


def test_a_taming_checkpoint_gives_tamings_encoder_decoder_and_codes(tmp_path):
    ref = taming_checkpoint(tmp_path / "taming")
    args = [str(tmp_path / "taming" / "last.ckpt"), "--config", str(tmp_path / "taming" / "model.yaml")]
    out = import_tokenizer([*args, "--output_dir", str(tmp_path / "s1"), "--pixel_range=-1,1"])
    model = VQVAE.from_pretrained(out)
    x = images()
    with torch.no_grad():
        h = ref["quant_conv"](ref["encoder"](x))  # (16, 4, 8, 8)
        torch.testing.assert_close(model.encoder(x), h, atol=1e-5, rtol=0)
        z_q, _, (_, _, theirs) = ref["quantize"](h)
        assert torch.equal(model.encode(x).flatten(), theirs)
        torch.testing.assert_close(model.decoder(z_q), ref["decoder"](ref["post_quant_conv"](z_q)), atol=1e-5, rtol=0)
    assert "taming/latent-diffusion VQGAN checkpoint" in (out / "README.md").read_text()

    ckpt = torch.load(tmp_path / "taming" / "last.ckpt", weights_only=False)
    torch.save({**ckpt, "callbacks": {"x": CallsShell(tmp_path / "ran")}}, tmp_path / "evil.ckpt")
    with pytest.raises(VqgenError, match=r"would call posix\.system when loaded\. vqgen ran nothing and refuses"):
        import_tokenizer(
            [str(tmp_path / "evil.ckpt"), *args[1:], "--output_dir", str(tmp_path / "e"), "--pixel_range=-1,1"]
        )
    assert not (tmp_path / "ran").exists() and not (tmp_path / "e").exists()


def test_ema_weights_are_taken_where_a_checkpoint_has_them_and_gumbel_is_refused(tmp_path):
    taming_checkpoint(tmp_path / "ldm", ema=True)
    ckpt = torch.load(tmp_path / "ldm" / "last.ckpt", weights_only=False)
    args = [str(tmp_path / "ldm" / "last.ckpt"), "--config", str(tmp_path / "ldm" / "model.yaml"), "--pixel_range=-1,1"]
    out = import_tokenizer([*args, "--output_dir", str(tmp_path / "ema")])
    weights = VQVAE.from_pretrained(out).state_dict()
    assert torch.equal(weights["encoder.net.conv_in.weight"], ckpt["state_dict"]["model_ema.encoderconv_inweight"])
    assert "(its EMA weights)" in (out / "README.md").read_text()
    raw = VQVAE.from_pretrained(import_tokenizer([*args, "--ema=off", "--output_dir", str(tmp_path / "raw")]))
    assert torch.equal(raw.state_dict()["encoder.net.conv_in.weight"], ckpt["state_dict"]["encoder.conv_in.weight"])

    gumbel = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("quantize")}
    gumbel["quantize.proj.weight"], gumbel["quantize.embed.weight"] = torch.randn(32, 8, 1, 1), torch.randn(32, 4)
    torch.save({"state_dict": gumbel}, tmp_path / "gumbel.ckpt")
    with pytest.raises(VqgenError, match="Gumbel-softmax VQGAN .* cannot express"):
        import_tokenizer([str(tmp_path / "gumbel.ckpt"), *args[1:], "--output_dir", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


def llamagen_shapes(ch=128, mult=(1, 1, 2, 2, 4), blocks=2, z=256, k=16384, d=8) -> dict[str, tuple]:
    """Every tensor of LlamaGen's VQModel (tokenizer/tokenizer_image/vq_model.py; VQ-16 by default), key and shape,
    enumerated from its module tree: conv_blocks with res/attn/downsample|upsample, mid = [res, attn, res]."""
    shapes = {}

    def conv(name, cin, cout, kernel):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, kernel, kernel), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3), norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels, top = len(mult), ch * mult[-1]
    conv("encoder.conv_in", 3, ch, 3)
    c = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * m)
            c = ch * m
            if i == levels - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
        if i != levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
    res("encoder.mid.0", top, top), attn("encoder.mid.1", top), res("encoder.mid.2", top, top)
    norm("encoder.norm_out", top), conv("encoder.conv_out", top, z, 3)
    conv("decoder.conv_in", z, top, 3)
    res("decoder.mid.0", top, top), attn("decoder.mid.1", top), res("decoder.mid.2", top, top)
    c = top
    for j, i in enumerate(reversed(range(levels))):  # lowest resolution first
        for b in range(blocks + 1):
            res(f"decoder.conv_blocks.{j}.res.{b}", c, ch * mult[i])
            c = ch * mult[i]
            if i == levels - 1:
                attn(f"decoder.conv_blocks.{j}.attn.{b}", c)
        if i != 0:
            conv(f"decoder.conv_blocks.{j}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, 3, 3)
    shapes["quantize.embedding.weight"], shapes["quantize.codebook_used"] = (k, d), (65536,)
    conv("quant_conv", z, d, 1), conv("post_quant_conv", d, z, 1)
    return shapes


def llamagen_argmin(z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """LlamaGen's lookup: both sides l2-normalised, argmin of z^2 + e^2 - 2 z.e."""
    z, e = torch.nn.functional.normalize(z, dim=-1), torch.nn.functional.normalize(embedding, dim=-1)
    return ((z**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * z @ e.t()).argmin(1)


def test_a_state_dict_with_exactly_vq16s_keys_and_shapes_imports_strictly_and_looks_up_as_llamagen(tmp_path):
    import argparse

    shapes = llamagen_shapes()
    assert sum(math.prod(s) for k, s in shapes.items() if k.startswith(("encoder", "decoder"))) > 70e6  # "72M"
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    torch.save({"model": state, "args": argparse.Namespace(vq_model="VQ-16")}, tmp_path / "vq_ds16_c2i.pt")
    out = import_tokenizer([str(tmp_path / "vq_ds16_c2i.pt"), "--output_dir", str(tmp_path / "s1")])  # range known
    model = VQVAE.from_pretrained(out)
    c = model.config
    assert (c.block_out_channels, c.downsample, c.attn_resolutions, c.latent_channels) == (
        [128, 128, 256, 256, 512], 16, [16], 256)  # fmt: skip
    assert (c.codebook_size, c.codebook_dim, c.l2_normalize, c.image_size) == (16384, 8, True, 256)
    mapped = sum(t.numel() for k, t in model.state_dict().items() if not k.startswith("quantizer."))
    assert mapped == sum(math.prod(s) for k, s in shapes.items() if not k.startswith("quantize."))
    assert torch.equal(model.quantizer.embed, state["quantize.embedding.weight"])
    z = torch.randn(4096, 8, generator=g)
    assert torch.equal(model.quantizer.nearest(z), llamagen_argmin(z, state["quantize.embedding.weight"]))
    assert "LlamaGen VQ checkpoint (its model weights)" in (out / "README.md").read_text()


def test_a_tiny_llamagen_layout_computes_what_the_same_taming_modules_compute(tmp_path):
    ref = taming_checkpoint(tmp_path / "taming")  # attention at 8 px: the lowest level, as LlamaGen puts it
    taming_state = torch.load(tmp_path / "taming" / "last.ckpt", weights_only=False)["state_dict"]
    renames = [(r"encoder\.down\.(\d)\.block\.", r"encoder.conv_blocks.\1.res."),
               (r"encoder\.down\.(\d)\.attn\.", r"encoder.conv_blocks.\1.attn."),
               (r"encoder\.down\.(\d)\.downsample\.", r"encoder.conv_blocks.\1.downsample."),
               (r"\.mid\.block_1\.", ".mid.0."), (r"\.mid\.attn_1\.", ".mid.1."),
               (r"\.mid\.block_2\.", ".mid.2.")]  # fmt: skip
    state = {}
    for key, tensor in taming_state.items():
        if key.startswith("loss."):
            continue
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        if m := re.fullmatch(r"decoder\.up\.(\d)\.(block|attn|upsample)\.(.+)", key):  # taming: highest first
            part = {"block": "res", "attn": "attn", "upsample": "upsample"}[m[2]]
            key = f"decoder.conv_blocks.{1 - int(m[1])}.{part}.{m[3]}"
        state[key] = tensor
    state["quantize.codebook_used"] = torch.zeros(65536)
    torch.save({"model": state, "ema": state}, tmp_path / "tiny.pt")
    out = import_tokenizer([str(tmp_path / "tiny.pt"), "--output_dir", str(tmp_path / "s1"), "--pixel_range=-1,1",
                            "--resolution=16", "--ema=on"])  # fmt: skip
    model = VQVAE.from_pretrained(out)
    x = images()
    with torch.no_grad():
        h = ref["quant_conv"](ref["encoder"](x))  # (16, 4, 8, 8)
        torch.testing.assert_close(model.encoder(x), h, atol=1e-5, rtol=0)
        flat = h.permute(0, 2, 3, 1).reshape(-1, 4)  # (16*8*8, 4)
        codes = llamagen_argmin(flat, taming_state["quantize.embedding.weight"])
        assert torch.equal(model.encode(x).flatten(), codes)
        e = torch.nn.functional.normalize(taming_state["quantize.embedding.weight"], dim=-1)
        z_q = e[codes].view(16, 8, 8, 4).permute(0, 3, 1, 2)  # (16, 4, 8, 8): LlamaGen's normalised codes
        want = ref["decoder"](ref["post_quant_conv"](z_q))
        # Two implementations of one decoder (taming's bmm attention, diffusers' SDPA) round apart by ~1e-5.
        torch.testing.assert_close(model.decode_codes(codes.view(16, 8, 8)), want, atol=2e-5, rtol=0)
    assert "(its EMA weights)" in (out / "README.md").read_text()


def test_a_hub_repo_with_a_subfolder_imports_with_its_known_range_revision_and_stated_license(tmp_path, monkeypatch):
    import vqgen.hub as hub

    snapshot = tmp_path / "snapshots" / ("ab12" * 10)  # the Hub cache names a snapshot by its commit
    tiny_vqmodel(snapshot / "vqvae", **LAYOUTS["lookup-from-codebook"])
    (snapshot / "README.md").write_text("---\nlicense: openrail++\n---\n# aMUSEd\n")
    calls = []

    def fake_snapshot_download(repo, **kwargs):  # the network boundary: what would be downloaded, and how
        calls.append((repo, kwargs))
        return str(snapshot)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    out = import_tokenizer(["amused/amused-256", "--subfolder", "vqvae", "--output_dir", str(tmp_path / "s1")])
    ((repo, kwargs),) = calls
    assert repo == "amused/amused-256" and "vqvae/*" in kwargs["allow_patterns"]
    source = VQVAE.from_pretrained(out).tokenizer_source
    assert source["pixel_range"] == [0.0, 1.0] and source["license"] == "openrail++"  # from the table, its card
    assert source["revision"] == snapshot.name and source["subfolder"] == "vqvae"
    assert "license as the source states it: openrail++" in (out / "README.md").read_text()
