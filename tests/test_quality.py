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
