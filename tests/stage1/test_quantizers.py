"""The quantizers against references: brute-force nearest codes, the paper's loss and gradient routing, EMA by
hand, restarts, k-means, fp32 search; the options (FSQ, rotation trick, cosine and projected lookups, SimVQ)."""

import math

import pytest
import torch
import torch.nn.functional as F

from stage1_vqvae.model import VQVAE, VQVAEConfig
from stage1_vqvae.quantizers import FiniteScalarQuantizer, VectorQuantizer, rotation_trick
from vqgen.cli import VqgenError
from vqgen.config import from_dict


def test_codes_equal_brute_force_nearest_neighbours():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=37, codebook_dim=5, decay=None).eval()
    z_e = torch.randn(3, 5, 4, 6)
    out = vq(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 5)
    brute = torch.stack([((vq.embed - v) ** 2).sum(1).argmin() for v in flat]).view(3, 4, 6)
    assert torch.equal(out.codes, brute)
    # The forward value of z_q is the chosen code vector itself.
    assert torch.allclose(out.z_q, vq.embed[brute].permute(0, 3, 1, 2))


def test_loss_matches_paper_and_gradients_are_routed_as_in_the_paper(tiny_config):
    """L = recon + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2; decoder <- recon, codebook <- codebook term,
    encoder <- recon + beta * commitment (straight-through)."""
    cfg = tiny_config
    cfg.decay = None
    cfg.commitment_weight = 0.25
    torch.manual_seed(1)
    model = VQVAE(cfg).train()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    out = model(x)

    # Reference computed from the equation with explicit stop-gradients.
    z_e = model.encoder(x)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, cfg.codebook_dim)
    codes = torch.cdist(flat.detach(), model.quantizer.embed.detach()).argmin(1)
    e = model.quantizer.embed[codes]
    z_q = (flat + (e - flat).detach()).view(4, 4, 4, -1).permute(0, 3, 1, 2)
    recon_term = F.mse_loss(model.decoder(z_q), x)
    codebook_term = F.mse_loss(e, flat.detach())
    commit_term = F.mse_loss(flat, e.detach())
    assert torch.equal(out.codes.flatten(), codes)
    assert torch.allclose(out.loss, recon_term + codebook_term + 0.25 * commit_term, atol=1e-6)

    def grads(loss):
        model.zero_grad()
        loss.backward(retain_graph=True)
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    g_model = grads(out.loss)
    g_recon = grads(recon_term)
    g_codebook = grads(codebook_term)
    g_commit = grads(commit_term)
    for name in g_model:
        if name.startswith("decoder."):
            assert torch.allclose(g_model[name], g_recon[name], atol=1e-6), name
            assert g_codebook[name].abs().max() == 0 and g_commit[name].abs().max() == 0, name
        elif name == "quantizer.embed":
            assert torch.allclose(g_model[name], g_codebook[name], atol=1e-7)
            assert g_recon[name].abs().max() == 0 and g_commit[name].abs().max() == 0
            assert g_model[name].abs().max() > 0
        else:
            assert name.startswith("encoder.")
            assert torch.allclose(g_model[name], g_recon[name] + 0.25 * g_commit[name], atol=1e-6), name
            assert g_codebook[name].abs().max() == 0, name


def test_commitment_weight_is_on_the_commitment_term_not_the_codebook_term():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, commitment_weight=0.25, decay=None).train()
    z_e = torch.randn(2, 3, 2, 2, requires_grad=True)
    out = vq(z_e)
    out.loss.backward()
    # d/d z_e of beta * mean||z_e - sg[e]||^2 = beta * 2 (z_e - e) / numel
    e = vq.embed.detach()[out.codes].permute(0, 3, 1, 2)
    expected = 0.25 * 2 * (z_e.detach() - e) / z_e.numel()
    assert torch.allclose(z_e.grad, expected, atol=1e-7)
    expected_embed = torch.zeros_like(vq.embed).index_add_(
        0, out.codes.flatten(), (2 * (e - z_e.detach()) / z_e.numel()).permute(0, 2, 3, 1).reshape(-1, 3)
    )
    assert torch.allclose(vq.embed.grad, expected_embed, atol=1e-7)


def test_one_ema_step_matches_hand_computation():
    torch.manual_seed(0)
    k, d, gamma, eps = 4, 2, 0.9, 1e-5
    vq = VectorQuantizer(k, d, decay=gamma, epsilon=eps).train()
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [-3.0, 2.0]]))
    vq.embed_avg.copy_(vq.embed)
    vq.cluster_size.fill_(1.0)
    pts = torch.tensor([[0.1, 0.0], [0.0, -0.2], [0.9, 1.2], [1.1, 0.8], [1.0, 1.0]])  # codes 0,0,1,1,1
    z_e = pts.T.reshape(1, d, 1, 5)  # (B=1, D, h=1, w=5)
    out = vq(z_e)
    assert out.codes.flatten().tolist() == [0, 0, 1, 1, 1]
    n_i = torch.tensor([2.0, 3.0, 0.0, 0.0])
    sums = torch.stack([pts[:2].sum(0), pts[2:].sum(0), torch.zeros(2), torch.zeros(2)])
    N = gamma * torch.ones(k) + (1 - gamma) * n_i
    m = gamma * torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [-3.0, 2.0]]) + (1 - gamma) * sums
    smoothed = (N + eps) / (N.sum() + k * eps) * N.sum()
    assert torch.allclose(vq.cluster_size, N)
    assert torch.allclose(vq.embed_avg, m)
    assert torch.allclose(vq.embed, m / smoothed[:, None], atol=1e-6)
    # In EMA mode the codebook is a buffer and the loss is the commitment term alone.
    assert "embed" not in dict(vq.named_parameters())
    assert torch.allclose(out.loss, 0.25 * out.commitment_loss)


def test_eval_mode_never_updates_the_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, decay=0.99, dead_code_window=1).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 3, 4, 4))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dead_codes_are_restarted_from_encoder_outputs_after_the_window():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, decay=0.99, dead_code_window=3).train()
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]))
    vq.embed_avg.copy_(vq.embed)
    z_e = torch.rand(1, 2, 4, 4) * 1.0  # all near codes 0/1: codes 2 and 3 are never chosen
    for _ in range(2):
        out = vq(z_e)
        assert out.dead_codes == 0
        assert vq.embed[2].min() > 50  # still far from the data: not restarted yet
    vq(z_e)  # third step unused: codes 2 and 3 restart from rows of this batch
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    for c in (2, 3):
        assert any(torch.allclose(vq.embed[c], v) for v in flat), c
        assert vq.code_age[c] == 0
    out = vq(z_e)
    assert out.usage > 0.5  # the restarted codes are now in use


def test_kmeans_init_places_codes_on_the_data():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    pts = centres.repeat_interleave(25, 0) + 0.1 * torch.randn(100, 2)
    vq = VectorQuantizer(4, 2, decay=0.99, kmeans_init=True, kmeans_iters=20).train()
    assert not bool(vq.initted)
    vq(pts.T.reshape(1, 2, 10, 10))
    assert bool(vq.initted)
    dists = torch.cdist(centres, vq.embed).min(1).values
    assert dists.max() < 0.5


def test_quantizer_runs_in_fp32_under_autocast():
    vq = VectorQuantizer(8, 4, decay=0.99).train()
    z = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.z_q.dtype == torch.float32 and vq.embed.dtype == torch.float32


def test_blocked_nearest_search_equals_one_big_argmin():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=512, codebook_dim=8, decay=None)
    flat = torch.randn(5000, 8)  # > one block of 2048 rows: exercises the blocked path and its ragged tail
    reference = torch.cdist(flat, vq.embed.detach()).argmin(1)
    assert torch.equal(vq.nearest(flat), reference)


def test_ema_mode_gradient_is_straight_through_plus_commitment():
    """EMA codebook: d/dz_e = d/dz_q (copied through the quantizer) + beta * 2 (z_e - e) / numel."""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, commitment_weight=0.25, decay=0.99).train()
    z_e = torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    upstream = torch.randn(2, 3, 2, 2)  # stands in for the decoder's d(recon)/dz_q
    out = vq(z_e)
    e = vq.embed[out.codes].permute(0, 3, 1, 2)  # codebook after this step's EMA update, as used for z_q
    assert torch.equal(out.z_q, e)
    (out.loss + (out.z_q * upstream).sum()).backward()
    expected = upstream + 0.25 * 2 * (z_e.detach() - e) / z_e.numel()
    assert torch.allclose(z_e.grad, expected, atol=1e-7)
    assert torch.allclose(out.loss, 0.25 * ((z_e.detach() - e) ** 2).mean())


def test_loading_a_state_dict_brings_back_kmeans_init_when_it_says_not_initialised():
    """The host-side copy of `initted` must not outlive a load_state_dict that resets it."""
    torch.manual_seed(0)
    vq = VectorQuantizer(1, 2, decay=0.99, kmeans_init=True).train()  # K=1: k-means puts the code at the mean
    fresh = {k: v.clone() for k, v in vq.state_dict().items()}  # initted = False
    vq(torch.randn(1, 2, 10, 10))
    assert bool(vq.initted) and vq.embed.norm() < 1
    vq.load_state_dict(fresh)
    far = torch.tensor([10.0, -7.0]).view(1, 2, 1, 1) + 0.1 * torch.randn(1, 2, 10, 10)
    vq(far)  # k-means runs again, on this batch: without it the EMA would move the code 1% of the way
    assert bool(vq.initted)
    assert torch.allclose(vq.embed[0], far.mean((0, 2, 3)), atol=1e-4)


def test_the_nearest_code_is_the_fp32_argmin_under_a_bf16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=512, codebook_dim=64, decay=None)
    flat = torch.randn(4000, 64)
    reference = torch.cdist(flat.double(), vq.embed.detach().double()).argmin(1)
    # What the search would choose in bf16: enough of these codes differ for the check below to mean something.
    bf16 = torch.cdist(flat.bfloat16().float(), vq.embed.detach().bfloat16().float()).argmin(1)
    assert (bf16 != reference).sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vq.nearest(flat), reference)
        model = VQVAE(VQVAEConfig(image_size=8, hidden_channels=8, res_channels=8, codebook_size=512, codebook_dim=8))
        images = torch.rand(16, 1, 8, 8) * 2 - 1
        under_autocast = model.encode(images)
    z_e = model.encoder(images).permute(0, 2, 3, 1).reshape(-1, 8)  # fp32, outside autocast
    assert torch.equal(under_autocast.flatten(), model.quantizer.nearest(z_e))


def test_the_ema_and_code_ages_advance_once_per_training_forward():
    """Documented: per forward pass, so per micro-batch under gradient accumulation."""
    vq = VectorQuantizer(4, 2, decay=0.9, dead_code_window=100).train()
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]))
    vq.embed_avg.copy_(vq.embed)
    z_e = torch.rand(1, 2, 2, 2) * 0.1  # every vector chooses code 0
    for _ in range(3):
        vq(z_e)
    assert vq.code_age.tolist() == [0, 3, 3, 3]
    assert torch.allclose(vq.cluster_size[1:], torch.full((3,), 0.9**3))  # unused codes decay once a forward


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
