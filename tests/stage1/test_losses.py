"""The VQGAN options: LPIPS-style perceptual distance, PatchGAN hinge loss, the adaptive weight, and training
with them (resumed exactly, the discriminator checkpointed with the VQ-VAE)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stage1_vqvae.losses import (
    LossConfig,
    PatchDiscriminator,
    PerceptualLoss,
    VQGANLoss,
    adaptive_weight,
    hinge_d_loss,
)
from stage1_vqvae.train import main
from vqgen.cli import VqgenError

from helpers import VGG16_CONVS, VGG16_POOLS, VGG16_TAPS, VGG16_WIDTHS, resumed_equals_uninterrupted, stage1_args


def reference_lpips(state, a, b, lin=None):
    """LPIPS written out layer by layer from the weights (independent of the module's Sequential)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        x, out = (x.expand(-1, 3, -1, -1) - shift) / scale, []
        for i in range(30):
            if i in VGG16_CONVS:
                x = F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1)
            elif i in VGG16_POOLS:
                x = F.max_pool2d(x, 2)
            else:
                x = F.relu(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out

    total = torch.zeros(a.shape[0])
    for j, (fa, fb) in enumerate(zip(taps(a), taps(b))):
        for n in range(a.shape[0]):
            u = fa[n] / (fa[n].norm(dim=0, keepdim=True) + 1e-10)  # (C, h, w)
            v = fb[n] / (fb[n].norm(dim=0, keepdim=True) + 1e-10)
            d = (u - v) ** 2
            w = lin[j].view(-1, 1, 1) if lin is not None else torch.ones(d.shape[0], 1, 1)
            total[n] += (d * w).sum(0).mean()
    return total


def test_the_perceptual_distance_equals_lpips_written_out(vgg16_file, tmp_path):
    path, state = vgg16_file
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1, torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    loss = PerceptualLoss(str(path))
    assert torch.allclose(loss(a, b), reference_lpips(state, a, b), rtol=1e-4, atol=1e-6)
    assert torch.allclose(loss(a, a), torch.zeros(3), atol=1e-6)
    widths = [VGG16_WIDTHS[VGG16_CONVS.index(t - 1)] for t in VGG16_TAPS]
    lin = [torch.rand(w, generator=g) for w in widths]
    torch.save({f"lin{j}.model.1.weight": w.view(1, -1, 1, 1) for j, w in enumerate(lin)}, tmp_path / "lin.pth")
    weighted = PerceptualLoss(str(path), str(tmp_path / "lin.pth"))
    assert torch.allclose(weighted(a, b), reference_lpips(state, a, b, lin), rtol=1e-4, atol=1e-6)
    assert not any(p.requires_grad for p in weighted.parameters()) and not weighted.train().training


def test_missing_or_foreign_perceptual_weights_are_one_clear_error_and_nothing_is_downloaded(
    tmp_path, monkeypatch, image_folder
):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(VqgenError, match=r"vgg16-397923af\.pth.*downloads nothing.*loss\.perceptual_weights"):
        PerceptualLoss(None)
    with pytest.raises(VqgenError, match=r"loss.perceptual_weights=.*nope.pth does not exist"):
        PerceptualLoss(str(tmp_path / "nope.pth"))
    torch.save({"something.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(VqgenError, match=r"is not torchvision's vgg16-397923af\.pth layout.*Missing key"):
        PerceptualLoss(str(tmp_path / "other.pth"))
    (tmp_path / "broken.pth").write_bytes(b"\x00" * 10)
    with pytest.raises(VqgenError, match="cannot be read"):
        PerceptualLoss(str(tmp_path / "broken.pth"))
    with pytest.raises(VqgenError, match="loss.perceptual_weights"):  # the CLI says the same before writing anything
        main(stage1_args(tmp_path / "run", image_folder, "loss.perceptual_weight=1.0", "train.max_steps=1"))
    assert not (tmp_path / "run").exists()


def test_hinge_loss_and_the_adaptive_weight_follow_their_definitions():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    expected = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    y = x @ w
    rec, g = (y**2).mean(), -y.sum() * 0.1
    gr = torch.autograd.grad(rec, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    assert adaptive_weight(rec, g, w).item() == pytest.approx((gr / (gg + 1e-4)).item(), rel=1e-6)
    assert adaptive_weight(rec, g * 0, w).item() == pytest.approx(min(gr.item() / 1e-4, 1e4), rel=1e-6)


def test_the_generator_terms_leave_the_discriminator_untouched_and_switch_on_at_disc_start(tiny_model):
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    disc = PatchDiscriminator(1, 4, 2)
    crit = VQGANLoss(LossConfig(adversarial_weight=0.5, disc_start=3), torch.device("cpu"))
    out = tiny_model.train()(x)
    before, logs = crit.generator_loss(out, x, 2, tiny_model.decoder.net[-1].weight, disc)
    assert torch.equal(before, out.loss) and logs == {}  # before disc_start: the paper's loss, no D forward
    out = tiny_model(x)
    total, logs = crit.generator_loss(out, x, 3, tiny_model.decoder.net[-1].weight, disc)
    expected = out.loss + 0.5 * logs["train/adaptive_weight"] * logs["train/g_loss"]
    assert torch.allclose(total, expected)
    total.backward()
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())


def test_the_discriminator_learns_the_sign_of_the_fakes_it_is_judged_on_in_the_generators_step():
    # The generator's step scores its fakes alone (train-mode BatchNorm): the discriminator's own step must see
    # fakes in the same kind of batch, or what it learned does not hold there. Sharp blocks are real, blurred
    # blocks are fake; trained on one concatenated batch, D scored fakes alone positive (+0.4 to +1.1, 3 seeds).
    def blocks(g, n):
        x = (torch.rand(n, 1, 4, 4, generator=g) > 0.5).float()
        return F.interpolate(x, scale_factor=4) * 2 - 1  # (n, 1, 16, 16) in [-1, 1]

    def blur(x):
        return F.avg_pool2d(x, 5, 1, 2)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    disc = PatchDiscriminator(1, 8, 2)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for _ in range(60):
        loss, logs = VQGANLoss.discriminator_loss(disc, blocks(g, 16), blur(blocks(g, 16)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["train/logits_real"] > 0 > logs["train/logits_fake"]
    with torch.no_grad():  # still in train mode, as in the generator's step
        assert disc(blur(blocks(g, 16))).mean() < -0.5 and disc(blocks(g, 16)).mean() > 0.5


def test_a_resumed_adversarial_perceptual_run_equals_the_uninterrupted_one(tmp_path, image_folder, vgg16_file):
    vgg, _ = vgg16_file
    common = ["train.max_steps=7", "train.checkpoint_every=3", "train.checkpoints_total_limit=5"]
    common += ["loss.adversarial_weight=0.5", "loss.disc_start=2", "loss.disc_layers=2", "loss.disc_channels=8"]
    common += ["loss.perceptual_weight=1.0", f"loss.perceptual_weights={vgg}"]

    def discriminator_saved(out):
        ckpt = out / "checkpoints" / "checkpoint_3"
        assert (ckpt / "model_1.safetensors").is_file() and (ckpt / "optimizer_1.bin").is_file()

    resumed_equals_uninterrupted(
        main,
        tmp_path / "a",
        tmp_path / "b",
        lambda out: stage1_args(out, image_folder, *common),
        ["checkpoint_6", "checkpoint_7"],
        discriminator_saved,
    )
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    da = load_file(str(tmp_path / "a" / "checkpoints" / "checkpoint_7" / "model_1.safetensors"))
    db = load_file(str(tmp_path / "b" / "checkpoints" / "checkpoint_7" / "model_1.safetensors"))
    for k in da:
        assert torch.equal(da[k], db[k]), k
    # The adversarial term changed training: the same run without it ends elsewhere.
    plain = main(stage1_args(tmp_path / "c", image_folder, *common[:3]))
    assert not torch.equal(
        load_file(str(plain / "model.safetensors"))["decoder.net.0.weight"], a["decoder.net.0.weight"]
    )


def test_a_discriminator_too_deep_for_the_images_is_one_clear_error(tmp_path, image_folder):
    with pytest.raises(VqgenError, match=r"disc_layers=3 shrinks 16x16 images to nothing; set loss.disc_layers=2"):
        main(stage1_args(tmp_path / "run", image_folder, "loss.adversarial_weight=0.5"))


def test_under_fp16_each_grad_scaler_is_updated_once_per_step_with_the_discriminator_on(tmp_path, image_folder,
                                                                                       monkeypatch):  # fmt: skip
    # fp16's GradScaler exists on CUDA only under Accelerate: the launch's scaler is made a CPU one here, which
    # runs the same scale / unscale / step / update calls. Each scaler updates once per optimizer step (PyTorch's
    # recipe); one scaler shared by both optimizers was updated twice per step.
    import stage1_vqvae.train as train

    real_build = train.build_accelerator

    def build_with_a_scaler(*args, **kwargs):
        accelerator, per_device = real_build(*args, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return accelerator, per_device

    updates: dict[int, int] = {}
    real_update = torch.amp.GradScaler.update

    def counted_update(self, *args, **kwargs):
        updates[id(self)] = updates.get(id(self), 0) + 1
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(train, "build_accelerator", build_with_a_scaler)
    monkeypatch.setattr(torch.amp.GradScaler, "update", counted_update)
    args = ["train.max_steps=4", "train.checkpoint_every=0", "train.max_grad_norm=1.0"]
    args += ["loss.adversarial_weight=0.5", "loss.disc_start=0", "loss.disc_layers=2", "loss.disc_channels=8"]
    main(stage1_args(tmp_path / "run", image_folder, *args))
    assert sorted(updates.values()) == [4, 4]  # the VQ-VAE's scaler and the discriminator's, once per step each
