"""Stage-1 images/s of the demo config at two commits, runs interleaved (the machine's speed drifts).

    python -m benchmarks.compare_commits --base a417d89 [--steps 200] [--repeats 2]

The base commit is checked out into a temporary git worktree and run with the same interpreter; the MNIST
cache is shared. Prints both rates and their ratio (this tree / base).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rate(tree: Path, out: Path, steps: int) -> float:
    cmd = [sys.executable, "-m", "stage1_vqvae.train", "--config", str(tree / "configs" / "mnist" / "stage1.yaml")]
    cmd += ["--output_dir", str(out), "--overwrite_output_dir", "train.report_to=none", "train.eval_every=0"]
    cmd += ["train.checkpoint_every=0", f"train.max_steps={steps}", "train.log_every=1000000"]
    env = dict(os.environ, PYTHONPATH=str(tree), TQDM_DISABLE="1")
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    return json.loads((out / "train_summary.json").read_text())["images_per_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            rates = {"base": [], "this": []}
            for _ in range(args.repeats):
                rates["base"].append(rate(base, Path(tmp) / "run_base", args.steps))
                rates["this"].append(rate(ROOT, Path(tmp) / "run_this", args.steps))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    b, t = max(rates["base"]), max(rates["this"])
    runs = f"this {[round(x) for x in rates['this']]}, base {[round(x) for x in rates['base']]}"
    print(
        f"| stage-1 img/s, demo config, {args.steps} steps | this tree {t:.0f} vs {args.base} {b:.0f} "
        f"({t / b:.2f}x) | {runs} |"
    )


if __name__ == "__main__":
    main()
