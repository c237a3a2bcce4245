"""The sample-quality judge against references: Frechet, KID, precision/recall, its real references."""

import dataclasses

import pytest
import torch

from stage2_prior.model import (
    PriorConfig,
    build_prior,
)
from vqgen.cli import VqgenError

from helpers import LAYOUT, codes_meta


def test_frechet_distance_against_the_closed_form():
    from stage2_prior.quality import frechet_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=g)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-4)
    # N(0, I) vs N(m, 4I): |m|^2 + tr(I + 4I - 2*2I) = |m|^2 + 3
    y = torch.randn(20000, 3, generator=g) * 2 + torch.tensor([1.0, 2.0, 0.0])
    assert frechet_distance(x, y) == pytest.approx(5.0 + 3.0, rel=0.05)


def test_kid_is_zero_in_expectation_for_one_distribution_and_positive_for_two():
    from stage2_prior.quality import kernel_distance

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    assert abs(kernel_distance(x, y)) < 0.01  # unbiased MMD^2 of one distribution
    assert kernel_distance(x, y + 1.0) > 0.5


def test_precision_and_recall_against_a_brute_force_count():
    from stage2_prior.quality import precision_recall

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(60, 2, generator=g), torch.randn(40, 2, generator=g) * 0.5 + 1.0
    p, r = precision_recall(fake, real, k=3)

    def kth(points, i):
        return sorted(float((points[i] - q).norm()) for q in points)[3]  # itself first, then 3 neighbours

    def share(a, b):
        return sum(any(float((x - y).norm()) <= kth(b, j) for j, y in enumerate(b)) for x in a) / len(a)

    assert p == pytest.approx(share(fake, real)) and r == pytest.approx(share(real, fake))


def test_small_classifier_learns_separable_classes():
    from stage2_prior.quality import features, predict, train_classifier

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=g)
    images = torch.randn(400, 1, 8, 8, generator=g) * 0.3
    images[labels == 1, :, :4] += 1.0  # class 1: bright top half
    model = train_classifier(images, labels, 2, steps=60, batch_size=64)
    assert (predict(model, images) == labels).float().mean() > 0.95 and features(model, images).shape == (400, 128)


def test_kid_leaves_the_callers_random_state_alone():
    from stage2_prior.quality import kernel_distance

    a, b = torch.randn(50, 4), torch.randn(50, 4)
    state = torch.random.get_rng_state()
    kernel_distance(a, b, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_validation_sweep_samples_each_row_with_exactly_its_settings(monkeypatch):
    # A row left None fell back to the prior's recommendation: "no top-p" drew with the recommended top-p 0.95.
    from stage2_prior import quality
    from stage2_prior.model import SamplingConfig

    seen = []

    class FakePipe:
        layout = LAYOUT

    fake = FakePipe()
    fake.prior = build_prior(
        PriorConfig(n_layer=1, n_head=1, n_embd=8, dropout=0.0), LAYOUT, codes_meta(), "c",
        SamplingConfig(guidance_scale=3.0, temperature=0.5, top_k=2, top_p=0.5),
    )  # fmt: skip

    def fake_sample(pipe, per_class, seed, **settings):
        seen.append(dataclasses.asdict(SamplingConfig.resolve(pipe.prior.generation_config, **settings)))
        return torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])

    class FakeJudge:
        split = "validation"

        def score(self, samples, asked, draws):
            return dict(recognised_as_asked=1.0, frechet_distance_ratio=1.0, kid=0.0, precision=1.0, recall=1.0,
                        frechet_distance_real_reference={})  # fmt: skip

    monkeypatch.setattr(quality, "sample_pipeline", fake_sample)
    rows = quality.sweep(FakeJudge(), fake, 1, 0)["rows"]
    assert len(rows) == len(seen) == 16
    for row, used in zip(rows, seen, strict=True):
        assert {k: used[k] for k in quality.SWEEP} == {k: row[k] for k in quality.SWEEP}
        assert used["top_k"] == LAYOUT.codebook_size  # off, not the prior's 2


def tiny_judge(split_labels: torch.Tensor, train_labels: torch.Tensor):
    """A Judge over random 28x28 'images' whose features carry their class in the last column."""
    from stage2_prior.quality import Judge, SmallClassifier

    torch.manual_seed(0)
    judge = Judge.__new__(Judge)
    judge.split, judge.classifier, judge.classifier_accuracy = "test", SmallClassifier(), 1.0
    judge.split_labels, judge.train_labels = split_labels, train_labels
    judge.split_features = torch.cat([torch.randn(len(split_labels), 7), split_labels[:, None].float()], 1)
    judge.train_images = torch.rand(len(train_labels), 1, 28, 28) * 2 - 1
    return judge


@pytest.mark.slow
def test_real_held_out_digits_score_like_the_size_matched_real_reference():
    from stage1_vqvae.data import DataConfig, load_splits, to_model_input
    from stage2_prior.quality import Judge, class_balanced_draw

    judge = Judge("test")
    validation = load_splits(DataConfig(source="mnist"), splits=("validation",))["validation"]
    pick = class_balanced_draw(validation.labels, 100, torch.Generator().manual_seed(1))
    result = judge.score(to_model_input(validation.images[pick]), validation.labels[pick])
    assert result["num_samples"] == 1000
    assert result["recognised_as_asked"] > 0.95 and judge.classifier_accuracy > 0.95
    # Real images are as far from the test split as the reference draws of real training images are.
    assert 0.7 < result["frechet_distance_ratio"] < 1.4
    assert result["frechet_distance_real_reference"]["std"] > 0  # several draws, a spread
    assert result["precision"] > 0.6 and result["recall"] > 0.6
    # Blurred digits are told apart from real ones.
    blurred = torch.nn.functional.avg_pool2d(to_model_input(validation.images[pick]), 3, 1, 1)
    assert judge.score(blurred, validation.labels[pick])["frechet_distance_ratio"] > 2


def test_draw_like_gives_the_asked_class_counts_without_repeats():
    from stage2_prior.quality import draw_like

    labels = torch.arange(10).repeat(30)  # (300,), 30 of each class
    asked = torch.tensor([3] * 25 + [7] * 5 + [0])
    rows = draw_like(labels, asked, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(labels[rows], minlength=10), torch.bincount(asked, minlength=10))
    assert len(set(rows.tolist())) == len(rows)
    again = draw_like(labels, asked, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)  # seeded

    with pytest.raises(VqgenError, match="40 samples of class 3 asked"):
        draw_like(labels, torch.full((40,), 3), torch.Generator())


def test_precision_recall_compare_with_a_random_subset_of_the_split_with_the_samples_classes(monkeypatch):
    import stage2_prior.quality as quality

    # An ordered split file (all zeros first, as MNIST's test file is ordered by origin) and samples of class 3.
    split_labels = torch.arange(10).repeat_interleave(40)  # (400,)
    judge = tiny_judge(split_labels, torch.arange(10).repeat(50))
    calls = []
    real_pr = quality.precision_recall
    monkeypatch.setattr(quality, "precision_recall", lambda a, b: calls.append(b) or real_pr(a, b))
    monkeypatch.setattr(quality, "features", lambda model, x: torch.randn(len(x), 8))
    monkeypatch.setattr(quality, "predict", lambda model, x: torch.full((len(x),), 3))
    result = judge.score(torch.zeros(30, 1, 28, 28), torch.full((30,), 3), draws=2)
    scored = calls[0]
    assert scored.shape == (30, 8) and torch.all(scored[:, -1] == 3)  # the asked class, not split[:30] (zeros)
    rows = [int((judge.split_features == r).all(1).nonzero()) for r in scored]
    assert len(set(rows)) == 30 and rows != sorted(rows)  # distinct rows, drawn at random
    # A real reference for precision and recall, as for FD and KID, against the same subset.
    assert len(calls) == 3 and all(torch.equal(c, scored) for c in calls[1:])
    for key in ("precision", "recall"):
        assert result[f"{key}_real_reference"]["draws"] == 2


def test_the_real_reference_has_the_samples_class_counts(monkeypatch):
    import stage2_prior.quality as quality

    train_labels = torch.arange(10).repeat(50)
    judge = tiny_judge(torch.arange(10).repeat(50), train_labels)
    drawn = []
    monkeypatch.setattr(quality, "predict", lambda model, x: torch.full((len(x),), 3))

    def features(model, x):
        drawn.append(x)
        return torch.randn(len(x), 8)

    monkeypatch.setattr(quality, "features", features)
    judge.score(torch.zeros(40, 1, 28, 28), torch.full((40,), 3), draws=2)
    for x in drawn[1:]:  # the samples' features first, then one real draw per reference
        rows = [int((judge.train_images == img).flatten(1).all(1).nonzero()) for img in x]
        assert torch.all(train_labels[rows] == 3)  # 40 threes against 40 real threes, not 40 zeros
