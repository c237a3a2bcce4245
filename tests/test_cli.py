"""One CLI dialect: HF flag names, config keys in --help, hints for wrong forms, old spellings, console scripts."""

import importlib
from pathlib import Path

import pytest
import tomllib

from vqgen.cli import VqgenError
from vqgen.config import builtin_configs, load_config

from helpers import ROOT, TINY1


def test_every_console_script_points_at_a_cli_that_parses_its_help(capsys):
    scripts = tomllib.loads(open(f"{ROOT}/pyproject.toml").read())["project"]["scripts"]
    modules = {"stage1_vqvae.train", "stage1_vqvae.evaluate", "stage1_vqvae.extract", "stage2_prior.train"}
    modules |= {"stage2_prior.evaluate", "stage2_prior.export", "sample", "stage2_prior.demo"}
    assert {target.split(":")[0] for target in scripts.values()} == modules  # every CLI has a console script
    for target in scripts.values():
        module, func = target.split(":")
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), func)(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "usage:" in text and "--batch-size" not in text and "--out " not in text, target


def test_training_help_lists_every_config_key_with_its_type_and_default(capsys):
    from stage1_vqvae.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for line in ("train.max_steps=10000  (an integer)", "model.decay=0.99  (a number or null)"):
        assert line in text
    assert "data.channels=\"L\"  (one of ['L', 'RGB'])" in text
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


def test_mixed_precision_is_left_to_accelerate_launch_unless_the_config_sets_it(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from stage2_prior.train import TrainConfig
    from vqgen.training import build_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    try:
        AcceleratorState._reset_state(True)
        accelerator, _ = build_accelerator(TrainConfig(report_to="none"), tmp_path)
        assert accelerator.mixed_precision == "bf16"
        AcceleratorState._reset_state(True)
        accelerator, _ = build_accelerator(TrainConfig(report_to="none", mixed_precision="no"), tmp_path)
        assert accelerator.mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(True)


def test_stage_2_never_imports_stage_1_training_code():
    import subprocess
    import sys

    code = "import sys, stage2_prior.train, stage2_prior.pipeline, sample; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "stage1_vqvae.train" not in out and "stage1_vqvae.extract" not in out


def test_imports_run_one_way_ground_floor_then_stage_1_then_stage_2():
    import ast

    def imported(paths):
        out = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    out |= {(node.module, a.name) for a in node.names}
                elif isinstance(node, ast.Import):
                    out |= {(a.name, None) for a in node.names}
        return out

    root = Path(ROOT)
    ground = imported((root / "vqgen").glob("*.py"))
    assert not {m for m, _ in ground if m.split(".")[0] in ("stage1_vqvae", "stage2_prior", "sample")}
    stage1 = imported((root / "stage1_vqvae").glob("*.py"))
    assert not {m for m, _ in stage1 if m.split(".")[0] in ("stage2_prior", "sample")}
    stage2 = imported([*(root / "stage2_prior").glob("*.py"), root / "sample.py"])
    assert not {m for m, _ in stage2 if m == "sample"}  # nothing imports the top-level CLI
    from_stage1 = {(m, n) for m, n in stage2 if m.startswith("stage1_vqvae")}
    # Only stage-1 things: the VQ-VAE, its data and its likelihood; what both share comes from vqgen.
    assert {m for m, _ in from_stage1} <= {"stage1_vqvae.model", "stage1_vqvae.data", "stage1_vqvae.evaluate"}
    assert len(from_stage1) <= 25


@pytest.mark.parametrize("name", [n for n in builtin_configs()])
def test_every_shipped_config_is_valid(name):
    from stage1_vqvae.train import Stage1Config
    from stage2_prior.train import Stage2Config

    cfg = load_config(Stage1Config if name.endswith("stage1.yaml") else Stage2Config, name, [])
    if name.endswith("stage1.yaml"):  # the model's geometry follows the data's
        assert cfg.model.image_size == cfg.data.resolution
        assert cfg.model.in_channels == (1 if cfg.data.channels == "L" else 3)


def test_under_a_launcher_an_error_of_every_rank_prints_once_and_a_rank_s_own_error_prints(monkeypatch, capsys):
    from vqgen.cli import run_cli

    def fails(every_rank):
        def main(argv):
            raise VqgenError("the problem and the fix", every_rank=every_rank)

        return main

    for rank, every_rank, printed in (("0", True, True), ("1", True, False), ("1", False, True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            run_cli(fails(every_rank), [])
        assert e.value.code == 2
        assert ("error: the problem and the fix" in capsys.readouterr().err) == printed, (rank, every_rank)


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


def test_the_model_geometry_follows_the_data_before_the_model_checks_it(tmp_path):
    # data.resolution=128 with model.downsample=8 was checked against the default image size 28 and refused.
    from stage1_vqvae.train import Stage1Config

    cfg = load_config(Stage1Config, "mnist/stage1", ["data.resolution=128", "data.channels=RGB", "model.downsample=8"])
    assert (cfg.model.image_size, cfg.model.in_channels, cfg.model.grid_size) == (128, 3, 16)
    with pytest.raises(VqgenError, match=r"image_size 30 \(data.resolution\) is not divisible by downsample 4"):
        load_config(Stage1Config, "mnist/stage1", ["data.resolution=30"])
    with pytest.raises(VqgenError, match="eval_max_batches must be positive or null"):
        load_config(Stage1Config, "mnist/stage1", ["train.eval_max_batches=0"])
