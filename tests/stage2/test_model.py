"""The prior: token layout, the untrained loss, save/load and the Hub, refusals, its recommended settings."""

import math

import pytest
import torch

from stage2_prior.model import (
    PriorConfig,
    TokenLayout,
    build_prior,
    codes_meta_of,
    grid_to_input_ids,
    labels_for,
    layout_of,
    load_prior,
)
from stage2_prior.sampling import sample_codes
from vqgen.cli import VqgenError

from helpers import (
    LAYOUT,
    codes_meta,
    tiny_prior,
)


def test_token_layout_round_trip():
    codes = torch.randint(0, 16, (5, 4, 4))
    classes = torch.tensor([0, 1, 2, 1, 0])
    ids = grid_to_input_ids(codes, LAYOUT, classes)
    assert ids.shape == (5, 18)
    assert (ids[:, 0] == 16).all() and ids[:, 1].tolist() == [17, 18, 19, 18, 17]
    assert torch.equal(ids[:, 2:6], codes[:, 0])  # raster order: first row first
    assert torch.equal(ids[:, 2:].reshape(-1, 4, 4), codes)
    assert (grid_to_input_ids(codes, LAYOUT)[:, 1] == LAYOUT.null).all() and LAYOUT.null == 20
    assert LAYOUT.vocab_size == 21
    labels = labels_for(ids)
    assert (labels[:, :2] == -100).all() and torch.equal(labels[:, 2:], ids[:, 2:])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_untrained_loss_is_about_ln_vocab(arch):
    layout = TokenLayout(codebook_size=64, num_classes=2, height=4, width=4)
    model = tiny_prior(layout, arch)
    ids = grid_to_input_ids(torch.randint(0, 64, (8, 4, 4)), layout, torch.tensor([0, 1] * 4))
    loss = model(input_ids=ids, labels=labels_for(ids)).loss.item()
    assert abs(loss - math.log(64)) < 0.3


def test_gpt2_prior_uses_gpt2s_gelu_formula():
    """The fused "gelu_pytorch_tanh" kernel computes GPT-2's tanh GELU: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))."""
    model = tiny_prior()
    x = torch.linspace(-6, 6, 1001)
    reference = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert torch.allclose(model.transformer.h[0].mlp.act(x), reference, atol=1e-6)


def test_save_load_round_trip_keeps_layout_and_outputs(tmp_path):
    model = tiny_prior()
    model.save_pretrained(tmp_path / "p")
    files = {p.name for p in (tmp_path / "p").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= files
    loaded = load_prior(str(tmp_path / "p"))
    assert layout_of(loaded) == LAYOUT and codes_meta_of(loaded) == codes_meta_of(model)
    ids = grid_to_input_ids(torch.randint(0, 16, (2, 4, 4)), LAYOUT, torch.tensor([0, 1]))
    assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_pushed_prior_loads_back(tmp_path, fake_hub):
    from vqgen.hub import upload_folder

    model = tiny_prior()
    model.save_pretrained(tmp_path / "p")
    upload_folder(tmp_path / "p", "me/prior", api=fake_hub())
    assert layout_of(load_prior(str(tmp_path / "remote" / "model" / "me" / "prior"))) == LAYOUT


def test_a_non_vqgen_or_pickle_prior_is_refused(tmp_path, tiny_model):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"not loaded")
    (tmp_path / "p" / "config.json").write_text("{}")
    with pytest.raises(VqgenError, match="no model.safetensors"):
        load_prior(str(tmp_path / "p"))
    tiny_model.save_pretrained(tmp_path / "vqvae")  # a VQ-VAE folder passed as the prior
    with pytest.raises(VqgenError, match="not a vqgen prior"):
        load_prior(str(tmp_path / "vqvae"))


def test_a_vqvae_or_codes_that_do_not_match_the_prior_are_refused_naming_both():
    learned = codes_meta_of(tiny_prior())
    learned.check_vqvae(16, 4, "f" * 64, "x")
    learned.check_same_vqvae(codes_meta(), "codes")
    with pytest.raises(VqgenError, match="fingerprints differ"):
        learned.check_vqvae(16, 4, "b" * 64, "VQ-VAE y")
    with pytest.raises(VqgenError, match="K=32"):
        learned.check_vqvae(32, 4, "f" * 64, "VQ-VAE y")
    with pytest.raises(VqgenError, match="grid"):
        learned.check_vqvae(16, 8, "f" * 64, "VQ-VAE y")
    with pytest.raises(VqgenError, match="fingerprints differ"):
        learned.check_same_vqvae(codes_meta(fingerprint="e" * 64), "codes")


def test_recommended_sampling_settings_travel_in_the_generation_config(tmp_path):
    from stage2_prior.model import SamplingConfig

    torch.manual_seed(0)
    recommended = SamplingConfig(guidance_scale=2.0, temperature=0.7, top_k=8, top_p=0.9)
    model = build_prior(
        PriorConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.0), LAYOUT, codes_meta(), "c", recommended
    )
    model.save_pretrained(tmp_path / "p")
    loaded = load_prior(tmp_path / "p")
    defaults = sample_codes(loaded, 6, classes=[0, 1, 2] * 2, generator=torch.Generator().manual_seed(3))
    explicit = sample_codes(
        loaded, 6, classes=[0, 1, 2] * 2, generator=torch.Generator().manual_seed(3),
        guidance_scale=2.0, temperature=0.7, top_k=8, top_p=0.9,
    )  # fmt: skip
    plain = sample_codes(
        loaded, 6, classes=[0, 1, 2] * 2, generator=torch.Generator().manual_seed(3), guidance_scale=1.0,
        temperature=1.0,
    )  # fmt: skip
    assert torch.equal(defaults, explicit) and not torch.equal(defaults, plain)


def test_sampling_settings_resolve_given_over_recommended_over_plain_and_validate_once():
    from stage2_prior.model import SamplingConfig

    model = build_prior(
        PriorConfig(n_layer=1, n_head=1, n_embd=8, dropout=0.0), LAYOUT, codes_meta(), "c",
        SamplingConfig(guidance_scale=2.0, temperature=0.7, top_k=None, top_p=0.9),
    )  # fmt: skip
    resolved = SamplingConfig.resolve(model.generation_config, temperature=0.0, top_k=5)
    assert resolved == SamplingConfig(guidance_scale=2.0, temperature=0.0, top_k=5, top_p=0.9)
    assert SamplingConfig.resolve(object()) == SamplingConfig()  # nothing recommended: plain sampling
    with pytest.raises(VqgenError, match="top_p must be in"):
        SamplingConfig.resolve(model.generation_config, top_p=1.5)
    # The sampler takes the resolved object as it is, and refuses a second way of saying it.
    a = sample_codes(model, 3, classes=[0, 1, 2], settings=resolved, generator=torch.Generator().manual_seed(1))
    b = sample_codes(model, 3, classes=[0, 1, 2], temperature=0.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        sample_codes(model, 3, classes=[0, 1, 2], settings=resolved, temperature=1.0)
