"""The VQ-VAE: the paper's architecture, save/load (strict, pickle refused, Hub), configs, shapes."""

import json

import pytest
import torch

from stage1_vqvae.model import VQVAE, VQVAEConfig
from vqgen.cli import VqgenError
from vqgen.config import load_config


def test_decode_codes_of_encode_equals_forward_reconstruction_in_eval(tiny_model):
    tiny_model.eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    out = tiny_model(x)
    codes = tiny_model.encode(x)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert torch.equal(codes, out.codes)
    assert torch.allclose(tiny_model.decode_codes(codes), out.reconstruction, atol=1e-6)


def test_architecture_follows_the_paper():
    model = VQVAE(VQVAEConfig(in_channels=3, image_size=32))
    strided = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert [(m.kernel_size, m.out_channels) for m in strided] == [((4, 4), 256), ((4, 4), 256)]
    blocks = [m for m in model.encoder.modules() if m.__class__.__name__ == "ResidualBlock"]
    assert len(blocks) == 2 and blocks[0].conv1.kernel_size == (3, 3) and blocks[0].conv2.kernel_size == (1, 1)
    ups = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.kernel_size, m.stride) for m in ups] == [((4, 4), (2, 2))] * 2
    assert model.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 8)


def test_save_load_round_trip_is_exact_and_strict(tiny_model, tmp_path):
    tiny_model.train()
    tiny_model(torch.rand(4, 1, 16, 16) * 2 - 1)  # move the EMA buffers away from their init
    tiny_model.eval()
    tiny_model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    loaded = VQVAE.from_pretrained(tmp_path / "m")
    assert loaded.config == tiny_model.config
    for (k, a), (_, b) in zip(sorted(tiny_model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), k
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), tiny_model.encode(x))

    # Strict: weights that do not match config.json are an error, not a silent partial load.
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_res_blocks"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VqgenError, match="does not match"):
        VQVAE.from_pretrained(tmp_path / "m")


def test_model_card_has_metadata(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    tiny_model.save_pretrained(
        tmp_path / "m", model_card_kwargs={"metrics": {"psnr": 20.5}, "image_size": 16, "training_data": "mnist"}
    )
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "vqgen"
    assert "vq-vae" in card.data.tags and card.data.pipeline_tag == "image-feature-extraction"
    assert "psnr | 20.5" in card.text and "mnist" in card.text


def test_push_to_hub_uploads_a_folder_that_loads_back(tiny_model, tmp_path, fake_hub):
    tiny_model.push_to_hub("user/tiny-vqvae")
    pushed = tmp_path / "remote" / "model" / "user" / "tiny-vqvae"
    loaded = VQVAE.from_pretrained(pushed)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), tiny_model.eval().encode(x))


def test_repo_id_loads_through_the_hub_download_boundary(tiny_model, tmp_path, monkeypatch):
    import vqgen.hub as hub

    tiny_model.save_pretrained(tmp_path / "snap")
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo, **kw: calls.append(repo) or str(tmp_path / "snap"))
    loaded = VQVAE.from_pretrained("someone/vqvae")
    assert calls == ["someone/vqvae"] and loaded.config == tiny_model.config


def test_repo_id_with_the_hub_unreachable_is_one_clear_error():
    with pytest.raises(VqgenError, match="Hub could not be reached"):
        VQVAE.from_pretrained("nobody/no-such-vqvae")


def test_a_pickle_only_folder_is_refused_and_never_unpickled(tiny_model, tmp_path):
    folder = tmp_path / "evil"
    tiny_model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(VqgenError, match="pickle"):
        VQVAE.from_pretrained(folder)
    assert not marker.exists()


def test_a_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VqgenError, match="config.json"):
        VQVAE.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize(
    "bad", [dict(codebook_size=1), dict(downsample=3), dict(image_size=30), dict(hidden_channels=0), dict(decay=1.5)]
)
def test_invalid_model_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        VQVAEConfig(**bad)


def test_wrong_input_shape_names_the_expected_shape(tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        tiny_model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="codes must lie"):
        tiny_model.decode_codes(torch.full((1, 4, 4), 99))


def test_fingerprint_ignores_memory_layout_but_not_values(tiny_model):
    from vqgen.hub import state_fingerprint

    before = state_fingerprint(tiny_model)
    assert state_fingerprint(tiny_model.to(memory_format=torch.channels_last)) == before
    with torch.no_grad():
        tiny_model.decoder.net[0].bias[0] += 1e-3
    assert state_fingerprint(tiny_model) != before


def test_the_model_geometry_follows_the_data_before_the_model_checks_it(tmp_path):
    # data.resolution=128 with model.downsample=8 was checked against the default image size 28 and refused.
    from stage1_vqvae.train import Stage1Config

    cfg = load_config(Stage1Config, "mnist/stage1", ["data.resolution=128", "data.channels=RGB", "model.downsample=8"])
    assert (cfg.model.image_size, cfg.model.in_channels, cfg.model.grid_size) == (128, 3, 16)
    with pytest.raises(VqgenError, match=r"image_size 30 \(data.resolution\) is not divisible by downsample 4"):
        load_config(Stage1Config, "mnist/stage1", ["data.resolution=30"])
    with pytest.raises(VqgenError, match="eval_max_batches must be positive or null"):
        load_config(Stage1Config, "mnist/stage1", ["train.eval_max_batches=0"])
