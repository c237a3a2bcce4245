"""The standard metrics against their reference implementations, with weight files the tests make themselves:
FID, KID, IS and precision/recall against torch-fidelity 0.4's `calculate_metrics` (features, then figures, to 1e-4
relative) and against their definitions written out; LPIPS against the `lpips` package, on two image sizes and on
L and RGB images; and the missing-weights errors."""

import os

import numpy as np
import pytest
import torch
import torch_fidelity

from vqgen.cli import VqgenError
from vqgen.metrics import scores
from vqgen.metrics.fidelity import features_of
from vqgen.metrics.inception import InceptionFeatures
from vqgen.metrics.lpips import LPIPS
from vqgen.metrics.standard import INCEPTION, MetricsConfig, cache_path, load_inception, load_lpips

from helpers import RGBImages, lpips_reference


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
            scores.gaussian_stats(f_fake["pool"]), scores.gaussian_stats(f_real["pool"])
        ),
        "kernel_inception_distance_mean": kid_mean, "kernel_inception_distance_std": kid_std,
        "inception_score_mean": is_mean, "inception_score_std": is_std, "precision": precision, "recall": recall,
    }  # fmt: skip
    for key, value in got.items():
        assert relative(value, want[key]) < 1e-4, (key, value, want[key])
    assert got["frechet_inception_distance"] > 1e-3 and 0 < precision < 1  # a real difference was measured


def test_the_scores_equal_their_definitions_written_out():
    """The figures vqgen takes from torch-fidelity's functions, at the settings vqgen passes, against the papers'
    definitions computed here independently (float64 numpy/scipy), on feature sets larger than Inception makes
    quickly here: FID at rank-deficient and full-rank covariances, KID with subsets of all rows (every subset is
    then the whole set, so the mean is the full unbiased MMD^2 and the std 0), IS over 10 splits, precision and
    recall by brute force."""
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    for n1, n2, d in ((120, 150, 512), (600, 500, 64)):
        a, b = torch.rand(n1, d, generator=g) ** 2 * 3, torch.rand(n2, d, generator=g) ** 2 * 3 + 0.05
        x, y = a.double().numpy(), b.double().numpy()
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        fid = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        assert relative(scores.frechet_distance(scores.gaussian_stats(a), scores.gaussian_stats(b)), fid) < 1e-4

        m = min(n1, n2)
        k = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731 (the cubic kernel of Binkowski et al.)
        kxx, kyy, kxy = k(x[:m], x[:m]), k(y[:m], y[:m]), k(x[:m], y[:m])
        mmd = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        mean, std = scores.kernel_distance(a[:m], b[:m], subset_size=m)
        assert relative(mean, mmd) < 1e-4 and std < 1e-4 * abs(mmd)

        logits = torch.randn(n1, 1008, generator=g) * 3
        p = torch.softmax(logits.double(), 1)[torch.from_numpy(np.random.RandomState(2020).permutation(n1))].numpy()
        chunks = [p[i * n1 // 10 : (i + 1) * n1 // 10] for i in range(10)]
        split_scores = [np.exp((c * (np.log(c) - np.log(c.mean(0)))).sum(1).mean()) for c in chunks]
        assert relative(scores.inception_score(logits)[0], float(np.mean(split_scores))) < 1e-6

        dist = lambda p, q: np.sqrt(((p[:, None] - q[None]) ** 2).sum(-1))  # noqa: E731 (brute force)
        radius_x, radius_y = np.sort(dist(x, x), 1)[:, 3], np.sort(dist(y, y), 1)[:, 3]  # 3rd neighbour, self at 0
        precision = (dist(x, y) <= radius_y[None] * (1 + 1e-6)).any(1).mean()
        recall = (dist(y, x) <= radius_x[None] * (1 + 1e-6)).any(1).mean()
        assert scores.precision_recall(a, b, chunk=37) == pytest.approx((precision, recall), abs=1.5 / min(n1, n2))


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
        load_inception(MetricsConfig(standard="on"))
    message = str(e.value)
    for phrase in (
        "weights-inception-2015-12-05-6726825d.pth",
        "95.6 MB",
        "6726825d",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "downloads nothing",
        "--inception_weights",
    ):
        assert phrase in message, phrase
    with pytest.raises(VqgenError, match=r"alexnet-owt-7be5be79\.pth.*233\.1 MB.*--lpips_backbone"):
        load_lpips(MetricsConfig(standard="on", lpips_net="alex"))
    with pytest.raises(VqgenError, match="does not exist"):
        load_inception(MetricsConfig(standard="on", inception_weights=str(tmp_path / "nope.pth")))
    assert load_inception(MetricsConfig(standard="auto")) is None and load_lpips(MetricsConfig(standard="off")) is None
    (tmp_path / "foreign.pth").write_bytes(b"\x00" * 8)
    with pytest.raises(VqgenError, match="cannot be read"):
        InceptionFeatures(tmp_path / "foreign.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(VqgenError, match="is not torch-fidelity's Inception-V3"):
        InceptionFeatures(tmp_path / "other.pth")


def test_a_weights_file_that_would_run_code_is_refused_before_torch_fidelity_opens_it(tmp_path):
    """torch-fidelity loads the file with weights_only=False; vqgen's check comes first."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(VqgenError, match="cannot be read"):
        InceptionFeatures(tmp_path / "evil.pth")
    assert not marker.exists()


def test_lpips_takes_the_linear_layers_the_package_ships_and_refuses_a_missing_file(tmp_path):
    ref, backbone, lin = lpips_reference(tmp_path, "alex")
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(LPIPS("alex", backbone, None)(a, b), LPIPS("alex", backbone, lin)(a, b))
    with pytest.raises(VqgenError, match=r"nope\.pth cannot be read"):
        LPIPS("alex", backbone, str(tmp_path / "nope.pth"))
    with pytest.raises(VqgenError, match="cannot score 16x16 images.*vgg"):
        LPIPS("alex", backbone, None).check_size(16, 16)


def test_weights_in_the_torch_hub_cache_are_found_without_a_flag(tmp_path, monkeypatch, inception_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    target = cache_path(INCEPTION)
    target.parent.mkdir(parents=True)
    os.symlink(inception_weights, target)
    x = image_set(2, 16, 3, 0.5, 0)
    found = load_inception(MetricsConfig(standard="on"))
    assert found.weights_path == target
    assert torch.equal(found(x)["pool"], InceptionFeatures(inception_weights)(x)["pool"])
    assert np.isfinite(found(x)["logits_unbiased"].numpy()).all()


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
