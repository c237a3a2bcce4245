"""The CLI wrapper (one error line, once under a launcher), console scripts, and imports that run one way."""

import importlib
import os
from pathlib import Path

import pytest
import tomllib

from vqgen.cli import VqgenError

from helpers import (
    ROOT,
)


def test_every_console_script_points_at_a_cli_that_parses_its_help(capsys):
    scripts = tomllib.loads(open(f"{ROOT}/pyproject.toml").read())["project"]["scripts"]
    modules = {"stage1_vqvae.train", "stage1_vqvae.evaluate", "stage1_vqvae.extract", "stage2_prior.train"}
    modules |= {"stage2_prior.evaluate", "stage2_prior.export", "sample", "stage2_prior.demo"}
    modules |= {"stage2_prior.evaluate_samples", "stage2_prior.app", "vqgen.requeue"}
    modules |= {"stage1_vqvae.export_diffusers", "stage1_vqvae.import_tokenizer"}
    assert {target.split(":")[0] for target in scripts.values()} == modules  # every CLI has a console script
    for target in scripts.values():
        module, func = target.split(":")
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), func)(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "usage:" in text and "--batch-size" not in text and "--out " not in text, target


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


ENDS = """
import atexit, os, sys, threading, time
from vqgen.cli import VqgenError, run_cli

def main(argv):
    how, marker = argv
    atexit.register(lambda: open(marker + ".atexit", "w").close())
    # A non-daemon thread still working when main() returns: the interpreter would wait for it, and so must we.
    threading.Thread(target=lambda: (time.sleep(0.3), open(marker + ".thread", "w").close())).start()
    print("buffered", end="")  # no newline: still in the buffer when the process ends
    if how == "exit75":
        raise SystemExit(75)
    if how == "message":
        raise SystemExit("a message")
    if how == "user":
        raise VqgenError("the problem and the fix", every_rank=True)
    if how == "bug":
        raise ValueError("a bug")

run_cli(main, sys.argv[1:])
"""


@pytest.mark.slow  # subprocesses: about a second each
@pytest.mark.parametrize(
    "how,rank,code,said",
    [("done", "1", 0, ""), ("exit75", "1", 75, ""), ("message", "1", 1, "a message"),
     ("user", "0", 2, "error: the problem and the fix"), ("user", "1", 2, ""),
     ("bug", "1", 1, "ValueError: a bug")],
)  # fmt: skip
def test_a_launched_rank_ends_with_mains_status_without_the_interpreters_teardown(tmp_path, how, rank, code, said):
    """Under a launcher, run_cli ends the rank before the interpreter's teardown (where gloo's threads can abort
    it): with main()'s exit status, after what the interpreter itself does first (threads joined, atexit run,
    output flushed). tests/launch_probe says when a process reaches the teardown."""
    import subprocess
    import sys

    from helpers import PROBE

    env = dict(os.environ, WORLD_SIZE="2", RANK=rank, PYTHONPATH=os.pathsep.join([PROBE, ROOT]))
    marker = str(tmp_path / "m")
    proc = subprocess.run([sys.executable, "-c", ENDS, how, marker], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "buffered"
    assert os.path.exists(marker + ".atexit") and os.path.exists(marker + ".thread")
    assert "teardown" not in proc.stderr and "not destroyed" not in proc.stderr, proc.stderr
    assert said in proc.stderr and (said or proc.stderr == ""), proc.stderr
    # Outside a launch the interpreter ends the process as usual.
    if how == "done":
        env["WORLD_SIZE"] = "1"
        alone = subprocess.run([sys.executable, "-c", ENDS, how, marker], env=env, capture_output=True, text=True,
                               timeout=60, cwd=ROOT)  # fmt: skip
        assert alone.returncode == 0 and alone.stdout == "buffered" and alone.stderr == ""


@pytest.mark.slow  # subprocesses or a compilation: seconds each
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
    stage1_things = {"stage1_vqvae.model", "stage1_vqvae.data", "stage1_vqvae.sources", "stage1_vqvae.evaluate"}
    assert {m for m, _ in from_stage1} <= stage1_things
    assert len(from_stage1) <= 25
