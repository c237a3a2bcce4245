"""Quantizer options beyond the paper, each against a reference: the rotation trick's value and gradient, FSQ's
levels and round trip, the cosine lookup, SimVQ's gradient routing; refusals; save, load and encode."""

import math

import pytest
import torch
import torch.nn.functional as F

from stage1_vqvae.model import VQVAE, VQVAEConfig
from stage1_vqvae.quantizers import FiniteScalarQuantizer, VectorQuantizer, rotation_trick
from vqgen.cli import VqgenError
from vqgen.config import from_dict


def test_the_rotation_trick_has_value_e_and_the_gradient_of_its_explicit_rotation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(5, 4, generator=g, dtype=torch.float64)
    out = rotation_trick(z, e)
    assert torch.allclose(out, e)
    upstream = torch.randn(5, 4, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    for i in range(5):  # lambda R, built as a matrix from the paper's definition
        zi, ei = z[i].detach(), e[i]
        z_hat, e_hat = zi / zi.norm(), ei / ei.norm()
        r = (z_hat + e_hat) / (z_hat + e_hat).norm()
        rotation = torch.eye(4, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(e_hat, z_hat)
        assert torch.allclose(rotation @ z_hat, e_hat)  # it takes z's direction onto e's
        assert torch.allclose(z.grad[i], (ei.norm() / zi.norm()) * rotation.t() @ upstream[i])


@pytest.mark.parametrize("levels", [[8, 5, 5, 3], [2, 8, 5, 2]])  # two levels: a sign split, no NaN
def test_fsq_levels_are_exact_and_codes_round_trip_to_values(levels):
    fsq = FiniteScalarQuantizer(levels)
    k = math.prod(levels)
    assert fsq.codebook_size == k and fsq.codebook_dim == 4
    z = torch.randn(1, 4, 50, 50, generator=torch.Generator().manual_seed(0)) * 3
    out = fsq(z)
    for dim, level in enumerate(levels):  # every dimension takes exactly its L values, scaled to [-1, 1]
        half = level // 2
        assert sorted(out.z_q[:, dim].unique().tolist()) == [(i - half) / half for i in range(level)]
    assert torch.equal(fsq.lookup(out.codes), out.z_q)  # codes -> values
    assert torch.equal(fsq.codes_of(fsq.codebook()), torch.arange(k))  # values -> codes, all K of them
    assert fsq.codebook().unique(dim=0).shape == (k, 4)
    assert torch.isfinite(out.z_q).all() and out.codes.min() >= 0 and out.codes.max() < k
    z.requires_grad_(True)
    fsq(z).z_q.sum().backward()
    assert z.grad.abs().sum() > 0  # straight through the rounding


def test_the_l2_lookup_is_the_cosine_argmax():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 6, decay=None, l2_normalize=True).eval()
    z = torch.randn(2, 6, 5, 5)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 6)
    cosine = F.normalize(flat, dim=1) @ F.normalize(vq.embed.detach(), dim=1).t()
    assert torch.equal(out.codes.flatten(), cosine.argmax(1))


def test_a_low_dimensional_lookup_projects_down_and_back_up():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, decay=None, lookup_dim=3, l2_normalize=True).eval()
    z = torch.randn(1, 8, 2, 2)
    out = vq(z)
    assert vq.embed.shape == (16, 3) and out.z_q.shape == (1, 8, 2, 2)
    codes_space = F.normalize(vq.project_in(z.permute(0, 2, 3, 1).reshape(-1, 8)), dim=1)
    expected = (codes_space @ F.normalize(vq.embed, dim=1).t()).argmax(1)
    assert torch.equal(out.codes.flatten(), expected)
    assert torch.allclose(out.z_q, vq.lookup(out.codes), atol=1e-6)  # what the decoder gets from codes alone


def test_simvq_gradient_reaches_the_linear_map_not_the_frozen_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, decay=None, codebook_transform="linear").train()
    assert not vq.embed.requires_grad and "embed" not in dict(vq.named_parameters())
    out = vq(torch.randn(2, 4, 3, 3))
    out.loss.backward()
    assert vq.codebook_map.weight.grad is not None and vq.codebook_map.weight.grad.abs().sum() > 0
    assert torch.equal(vq.codebook(), vq.codebook_map(vq.embed))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"quantizer": "fsq", "fsq_levels": [8, 5], "l2_normalize": True}, "no codebook"),
        ({"quantizer": "fsq"}, "needs fsq_levels"),
        ({"codebook_transform": "linear"}, "decay null"),
        ({"fsq_levels": [4, 4]}, "quantizer is vq"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(bad, match):
    with pytest.raises(VqgenError, match=match):
        from_dict(VQVAEConfig, bad, "model")


@pytest.mark.parametrize(
    "options",
    [
        {"quantizer": "fsq", "fsq_levels": [4, 4], "decay": None},
        {"lookup_dim": 4, "l2_normalize": True},
        {"straight_through": "rotation", "decay": None},
        {"codebook_transform": "linear", "decay": None},
        {"codebook_transform": "linear", "decay": None, "lookup_dim": 4},  # the ablation's SimVQ
        {"quantizer": "fsq", "fsq_levels": [4, 2, 2], "decay": None},  # a level of 2, as the ablation's FSQ
    ],
)
def test_every_option_trains_saves_loads_and_encodes(options, tmp_path):
    cfg = VQVAEConfig(image_size=16, hidden_channels=16, res_channels=8, num_res_blocks=1, codebook_size=16,
                      codebook_dim=8, **options)  # fmt: skip
    torch.manual_seed(0)
    model = VQVAE(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    for _ in range(3):
        out = model(images)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval().save_pretrained(tmp_path / "m")
    loaded = VQVAE.from_pretrained(tmp_path / "m")
    codes = loaded.encode(images)
    assert codes.shape == (8, 4, 4) and int(codes.max()) < cfg.codebook_size
    assert torch.equal(codes, model.encode(images))
    assert torch.allclose(loaded.decode_codes(codes), model(images).reconstruction, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the lookup stays fp32 under autocast
        assert torch.equal(loaded.encode(images), codes)


def test_a_lookup_dim_equal_to_d_still_uses_its_projections():
    """Every parameter must get a gradient (DDP refuses unused ones), also when lookup_dim == codebook_dim."""
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, decay=None, lookup_dim=4).train()
    out = vq(torch.randn(2, 4, 3, 3))
    (out.loss + out.z_q.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vq.parameters())
