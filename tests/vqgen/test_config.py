"""Typed configs: unknown keys and wrong types refused, YAML 1.2 scalars, hints, --help, the shipped configs."""

import pytest

from stage1_vqvae.train import main
from vqgen.cli import VqgenError
from vqgen.config import builtin_configs, load_config

from helpers import TINY1


def test_training_help_lists_every_config_key_with_its_type_and_default(capsys):
    from stage1_vqvae.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for line in ("train.max_steps=10000  (an integer)", "model.decay=0.99  (a number or null)"):
        assert line in text
    assert "data.channels=\"L\"  (one of ['L', 'RGB'])" in text
    # Each key's documentation comes from its field's metadata (HfArgumentParser's convention), not its source.
    assert "model.decay=0.99  (a number or null)  EMA decay gamma" in text
    assert "--resume_from_checkpoint" in text and "--output_dir" in text and "--push_to_hub" in text


def test_a_missing_config_names_the_configs_to_pick_from(tmp_path):
    from stage1_vqvae.train import main

    with pytest.raises(VqgenError, match=r"pass --config.*mnist/stage1.yaml"):
        main([f"train.output_dir={tmp_path}"])
    assert "mnist/stage1.yaml" in builtin_configs() and "tiny/stage2.yaml" in builtin_configs()
    # Built-in configs by name, as from an installed wheel.
    from stage1_vqvae.train import Stage1Config

    assert load_config(Stage1Config, "mnist/stage1", []).model.codebook_size == 512


def test_a_flag_in_the_wrong_form_gets_the_dotted_form_as_a_hint(tmp_path):
    from stage1_vqvae.train import main

    with pytest.raises(VqgenError, match=r"train\.max_steps=VALUE"):
        main(["--config", TINY1, "--max_steps", "5"])
    with pytest.raises(VqgenError, match=r"model\.codebook_size=VALUE"):
        main(["--config", TINY1, "codebook_size=5"])


@pytest.mark.parametrize("name", [n for n in builtin_configs()])
def test_every_shipped_config_is_valid(name):
    from stage1_vqvae.train import Stage1Config
    from stage2_prior.train import Stage2Config

    cfg = load_config(Stage1Config if name.endswith("stage1.yaml") else Stage2Config, name, [])
    if name.endswith("stage1.yaml"):  # the model's geometry follows the data's
        assert cfg.model.image_size == cfg.data.resolution
        assert cfg.model.in_channels == (1 if cfg.data.channels == "L" else 3)


def test_scientific_notation_without_a_dot_is_a_float_in_files_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; users and YAML 1.2 mean a number.
    from stage1_vqvae.train import Stage1Config
    from vqgen.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n  weight_decay: 5E-2\n")
    cfg = load_config(Stage1Config, str(path), ["train.min_lr_ratio=1e-1", "data.source=1e5x"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.weight_decay == 0.05 and cfg.train.min_lr_ratio == 0.1
    assert cfg.data.source == "1e5x"  # not a number: stays a string


def test_no_and_off_are_words_and_only_true_false_are_booleans(tmp_path):
    # PyYAML (YAML 1.1) reads no/off/yes/on as booleans: train.mixed_precision=no was refused as False.
    from stage1_vqvae.train import Stage1Config
    from vqgen.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\ndata:\n  hflip: True\n")
    cfg = load_config(Stage1Config, str(path), [])
    assert cfg.train.mixed_precision == "no" and cfg.data.hflip is True
    cfg = load_config(Stage1Config, str(path), ["train.mixed_precision=no", "data.hflip=false"])
    assert cfg.train.mixed_precision == "no" and cfg.data.hflip is False
    with pytest.raises(VqgenError, match="data.hflip"):
        load_config(Stage1Config, str(path), ["data.hflip=yes"])  # a word, not a boolean: one clear error


def test_unknown_keys_and_wrong_types_are_rejected(tmp_path):
    with pytest.raises(VqgenError, match=r"unknown key\(s\) \['lerning_rate'\]"):
        main(["--config", TINY1, "train.lerning_rate=0.1", f"train.output_dir={tmp_path}"])
    with pytest.raises(VqgenError, match="train.max_steps: expected an integer"):
        main(["--config", TINY1, "train.max_steps=ten", f"train.output_dir={tmp_path}"])
    with pytest.raises(VqgenError, match="codebook_size"):
        main(["--config", TINY1, "model.codebook_size=1", f"train.output_dir={tmp_path}"])
    with pytest.raises(VqgenError, match="does not exist"):
        main(["--config", str(tmp_path / "nope.yaml")])
