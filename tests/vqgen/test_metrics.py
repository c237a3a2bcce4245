"""The standard metrics against their reference implementations, with weight files the tests make themselves:
FID, KID, IS and precision/recall against torch-fidelity 0.4 (features, then figures, to 1e-4 relative), LPIPS
against the `lpips` package, on two image sizes and on L and RGB images; and the missing-weights errors."""

import os

import numpy as np
import pytest
import torch

from vqgen.cli import VqgenError
from vqgen.metrics import scores
from vqgen.metrics.fidelity import features_of
from vqgen.metrics.inception import InceptionFeatures, tf1_resize
from vqgen.metrics.lpips import LPIPS
from vqgen.metrics.weights import INCEPTION, cache_path

from helpers import RGBImages, lpips_reference

torch_fidelity = pytest.importorskip("torch_fidelity", reason="torch-fidelity is a test dependency ([dev])")


def image_set(n: int, size: int, channels: int, shift: float, seed: int) -> torch.Tensor:
    """uint8 (n, C, size, size): smooth random fields (a blob and a gradient) plus noise, `shift` moves them."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy, w = torch.rand(3, generator=g)
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 + 0.1 * w))
        base = 200 * blob + 55 * (xx * shift + yy * (1 - shift))
        img = base[None].repeat(channels, 1, 1) + 20 * torch.randn(channels, size, size, generator=g)
        out.append(img.clamp(0, 255).round().to(torch.uint8))
    return torch.stack(out)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_tf1_resize_equals_torch_fidelitys_bilinear_resize():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as ref

    x = torch.rand(2, 3, 17, 32) * 255
    for size in (299, 64, 8):
        want = ref(x, size=(size, size), align_corners=False)
        assert torch.allclose(tf1_resize(x, size), want, atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("size,channels", [(32, 1), (48, 3)])
def test_fid_kid_is_precision_recall_equal_torch_fidelity(inception_weights, size, channels):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fake, real = image_set(16, size, channels, 0.2, 0), image_set(20, size, channels, 0.8, 1)
    ours = InceptionFeatures(inception_weights)
    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(inception_weights)
    )
    f_fake, f_real = features_of(ours, fake), features_of(ours, real)
    t_pool, t_logits = theirs(RGBImages(fake).images.contiguous())
    assert torch.allclose(f_fake["pool"], t_pool, rtol=1e-4, atol=1e-6)
    assert torch.allclose(f_fake["logits_unbiased"], t_logits, rtol=1e-4, atol=1e-6)

    want = torch_fidelity.calculate_metrics(
        input1=RGBImages(fake), input2=RGBImages(real), cuda=False, fid=True, kid=True, isc=True, prc=True,
        kid_subset_size=10, feature_extractor="inception-v3-compat",  # (its default for prc is VGG16)
        feature_extractor_weights_path=str(inception_weights), save_cpu_ram=True, verbose=False,
    )  # fmt: skip
    kid_mean, kid_std = scores.kernel_distance(f_fake["pool"], f_real["pool"], subset_size=10)
    is_mean, is_std = scores.inception_score(f_fake["logits_unbiased"])
    precision, recall = scores.precision_recall(f_fake["pool"], f_real["pool"])
    got = {
        "frechet_inception_distance": scores.frechet_distance(
            scores.GaussianStats.of(f_fake["pool"]), scores.GaussianStats.of(f_real["pool"])
        ),
        "kernel_inception_distance_mean": kid_mean, "kernel_inception_distance_std": kid_std,
        "inception_score_mean": is_mean, "inception_score_std": is_std, "precision": precision, "recall": recall,
    }  # fmt: skip
    for key, value in got.items():
        assert relative(value, want[key]) < 1e-4, (key, value, want[key])
    assert got["frechet_inception_distance"] > 1e-3 and 0 < precision < 1  # a real difference was measured


def test_the_scores_equal_torch_fidelity_on_features_of_several_shapes():
    """The figures alone, on larger feature sets than Inception can make quickly here (FID at rank-deficient
    and full-rank covariances, KID at torch-fidelity's default 100 subsets)."""
    from torch_fidelity import metric_fid, metric_isc, metric_kid, metric_prc

    g = torch.Generator().manual_seed(0)
    for n1, n2, d in ((120, 150, 2048), (600, 500, 64)):
        a, b = torch.rand(n1, d, generator=g) ** 2 * 3, torch.rand(n2, d, generator=g) ** 2 * 3 + 0.05
        ref = metric_fid.fid_statistics_to_metric(
            metric_fid.fid_features_to_statistics(a), metric_fid.fid_features_to_statistics(b), False
        )["frechet_inception_distance"]
        assert relative(scores.frechet_distance(scores.GaussianStats.of(a), scores.GaussianStats.of(b)), ref) < 1e-4
        kid = metric_kid.kid_features_to_metric(
            a, b, kid_subsets=100, kid_subset_size=100, verbose=False, rng_seed=2020, kid_kernel="poly",
            kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
        )  # fmt: skip
        mean, std = scores.kernel_distance(a, b, subset_size=100)
        assert relative(mean, kid["kernel_inception_distance_mean"]) < 1e-4
        assert relative(std, kid["kernel_inception_distance_std"]) < 1e-4
        logits = torch.randn(n1, 1008, generator=g) * 3
        isc = metric_isc.isc_features_to_metric(logits)
        assert relative(scores.inception_score(logits)[0], isc["inception_score_mean"]) < 1e-4
        prc = metric_prc.prc_features_to_metric(
            a, b, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False
        )
        assert scores.precision_recall(a, b, chunk=37) == (prc["precision"], prc["recall"])


def test_too_few_images_for_a_metric_is_one_clear_error():
    a = torch.rand(8, 16)
    with pytest.raises(VqgenError, match="KID draws subsets of 1000.*--kid_subset_size"):
        scores.kernel_distance(a, a)
    with pytest.raises(VqgenError, match="more than k=3"):
        scores.precision_recall(a[:3], a)
    with pytest.raises(VqgenError, match="at least 10"):
        scores.inception_score(torch.rand(5, 1008))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_lpips_package(tmp_path, net):
    ref, backbone, lin = lpips_reference(tmp_path, net)
    ours = LPIPS(net, backbone, lin)
    for size, channels in ((32, 3), (64, 1)):
        a = image_set(3, size, channels, 0.2, 0).float() / 127.5 - 1
        b = image_set(3, size, channels, 0.7, 1).float() / 127.5 - 1
        want = ref(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)).flatten()
        got = ours(a, b)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got, want)
        assert (got > 0).all()


def test_missing_weights_are_one_error_naming_the_file_size_checksum_and_source(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(VqgenError) as e:
        InceptionFeatures(None)
    message = str(e.value)
    for phrase in (
        INCEPTION.name,
        "95.6 MB",
        INCEPTION.sha256,
        INCEPTION.url,
        "downloads nothing",
        "--inception_weights",
    ):
        assert phrase in message, phrase
    with pytest.raises(VqgenError, match=r"alexnet-owt-7be5be79\.pth.*233\.1 MB.*--lpips_backbone"):
        LPIPS("alex", None, None)
    from torchvision.models import alexnet

    torch.save(alexnet().state_dict(), tmp_path / "alex.pth")  # a backbone, but no linear layers anywhere
    with pytest.raises(VqgenError, match=r"lpips-v0\.1-alex\.pth.*6,009 bytes.*df73285e.*--lpips_weights"):
        LPIPS("alex", str(tmp_path / "alex.pth"), None)
    with pytest.raises(VqgenError, match="does not exist"):
        InceptionFeatures(tmp_path / "nope.pth")
    (tmp_path / "foreign.pth").write_bytes(b"\x00" * 8)
    with pytest.raises(VqgenError, match="cannot be read"):
        InceptionFeatures(tmp_path / "foreign.pth")


def test_weights_in_the_torch_hub_cache_are_found_without_a_flag(tmp_path, monkeypatch, inception_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    target = cache_path(INCEPTION)
    target.parent.mkdir(parents=True)
    os.symlink(inception_weights, target)
    x = image_set(2, 16, 3, 0.5, 0)
    assert torch.equal(InceptionFeatures(None)(x)["pool"], InceptionFeatures(inception_weights)(x)["pool"])
    assert np.isfinite(InceptionFeatures(None)(x)["logits_unbiased"].numpy()).all()


class MeanColours(torch.nn.Module):
    """A stand-in feature extractor (mean colours on a 4x4 grid), with the digest the cache keys on: the cache
    logic is the Inception's, in milliseconds."""

    digest = "0123456789abcdef" * 4

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        pool = torch.nn.functional.adaptive_avg_pool2d(x.expand(-1, 3, -1, -1).float(), 4).flatten(1)  # (B, 48)
        return {"pool": pool, "logits_unbiased": pool}


def test_cached_reference_statistics_follow_every_setting_that_changes_pixels_or_labels(tmp_path):
    # Audit 3, S4-1: a split decoded on the fly was keyed without its resize mode or label column, and the cache
    # served crop's statistics to stretch and pad (FID 179.54 both times; 530.73 from a cold cache).
    from PIL import Image

    from stage1_vqvae.data import DataConfig, load_splits
    from vqgen.metrics.fidelity import ReferenceSplit

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for split in ("train", "validation", "test"):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (12, 24, 3), dtype=np.uint8)  # (H, W, 3): wide
                pixels[:, :6] = 255  # a bright edge that crop cuts away and stretch and pad keep
                Image.fromarray(pixels).save(tmp_path / "images" / split / cls / f"{i}.png")
    extractor, cache = MeanColours(), tmp_path / "cache"

    def reference(cache_dir, **settings):
        cfg = DataConfig(**{"source": str(tmp_path / "images"), "resolution": 8, "channels": "RGB", **settings})
        split = load_splits(cfg, splits=("test",), in_memory=False)["test"]  # decoded on the fly, as a big split
        loader = torch.utils.data.DataLoader(split, batch_size=4)
        return ReferenceSplit.load_or_compute(split, loader, extractor, None, cache_dir)

    settings = [{"resize_mode": "crop"}, {"resize_mode": "stretch"}, {"resize_mode": "pad"}, {"resolution": 4},
                {"resize_mode": "crop", "label_column": "none"}]  # fmt: skip
    for each in settings:
        cached = reference(cache, **each)  # each one after all the others have filled the cache
        truth = reference(None, **each)
        assert torch.equal(cached.pool, truth.pool) and torch.equal(cached.labels, truth.labels), each
    assert len(list((cache / "fidelity").glob("*.safetensors"))) == len(settings)
    assert reference(cache, resize_mode="crop", label_column="none").labels.tolist() == [-1] * 6
