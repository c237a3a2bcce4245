"""The honest sample metrics against a reference: real held-out digits scored as if they were samples."""

import pytest
import torch


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


def test_draw_like_gives_the_asked_class_counts_without_repeats():
    from stage2_prior.quality import draw_like

    labels = torch.arange(10).repeat(30)  # (300,), 30 of each class
    asked = torch.tensor([3] * 25 + [7] * 5 + [0])
    rows = draw_like(labels, asked, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(labels[rows], minlength=10), torch.bincount(asked, minlength=10))
    assert len(set(rows.tolist())) == len(rows)
    again = draw_like(labels, asked, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)  # seeded
    from vqgen.cli import VqgenError

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
