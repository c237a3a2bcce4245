"""Candidate MNIST recipes for the demo, each carried through the whole pipeline and scored on the validation
split (recipes and sampling settings are chosen on validation, never on test; docs/quality.md).

    python -m experiments.recipes --recipes demo,f2_k128 [--parallel 4] [--sweep] [--output_dir runs/recipes]

A recipe is a pair of override lists (stage 1, stage 2) on the demo's configs. Each run writes
OUTPUT_DIR/NAME/result.json: stage-1 PSNR and usage on validation, the prior's bits per code on validation,
the training times, and the honest sample metrics of 1000 samples (the prior's own settings; with --sweep the
whole validation sweep of `stage2_prior.quality`). Runs go in parallel processes: the figures are the point here,
and the time each stage takes on the 2-core CPU is measured by `make demo`, not by this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name: (stage-1 overrides, stage-2 overrides)
RECIPES: dict[str, tuple[list[str], list[str]]] = {
    "demo": ([], []),
    # 14x14 codes (f=2): sharper reconstructions, a 4x longer sequence for the prior
    "f2_k128": (
        ["model.downsample=2", "model.codebook_size=128", "model.codebook_dim=32", "train.max_steps=500"],
        ["train.max_steps=500"],
    ),  # fmt: skip
    "f2_k256": (
        ["model.downsample=2", "model.codebook_size=256", "model.codebook_dim=32", "train.max_steps=500"],
        ["train.max_steps=500"],
    ),  # fmt: skip
    "f2_k64": (
        ["model.downsample=2", "model.codebook_size=64", "model.codebook_dim=16", "train.max_steps=500"],
        ["train.max_steps=500"],
    ),  # fmt: skip
    # the demo's stage 1 with a larger prior: how much of the gap is the prior's
    "demo_prior6x128": ([], ["model.n_layer=6", "model.n_embd=128"]),
    # the demo with its stage-1 budget doubled
    "demo_s1_3000": (["train.max_steps=3000"], []),
}


def sh(args: list, log) -> float:
    t0 = time.perf_counter()
    log.write(f"\n$ {' '.join(map(str, args))}\n")
    log.flush()
    subprocess.run([sys.executable, *map(str, args)], check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return round(time.perf_counter() - t0, 1)


def one(name: str, out: Path, sweep: bool, smoke: bool = False) -> dict:
    s1_over, s2_over = RECIPES[name]
    if smoke:  # the plumbing only: a few steps, a few samples
        s1_over, s2_over = [*s1_over, "train.max_steps=4", "data.max_samples=512"], [*s2_over, "train.max_steps=4"]
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    s1, codes, s2, pipe, q = d / "stage1", d / "codes", d / "stage2", d / "pipeline", d / "quality"
    t: dict = {}
    with open(d / "log.txt", "w") as log:
        common = ["--overwrite_output_dir", "train.report_to=none", "train.checkpoint_every=0"]
        t["stage 1"] = sh(["-m", "stage1_vqvae.train", "--config", "mnist/stage1", "--output_dir", s1, *common,
                           *s1_over], log)  # fmt: skip
        t["extract"] = sh(["-m", "stage1_vqvae.extract", "--model", s1 / "model", "--output_dir", codes,
                           "--overwrite_output_dir"], log)  # fmt: skip
        t["stage 2"] = sh(["-m", "stage2_prior.train", "--config", "mnist/stage2", "--output_dir", s2, *common,
                           f"data.codes={codes}", *s2_over], log)  # fmt: skip
        t["export"] = sh(["-m", "stage2_prior.export", "--vqvae", s1 / "model", "--prior", s2 / "model",
                          "--output_dir", pipe, "--overwrite_output_dir"], log)  # fmt: skip
        t["quality"] = sh(["-m", "stage2_prior.quality", "--pipeline", pipe, "--split", "validation",
                           "--output_dir", q, *(["--sweep"] if sweep else []),
                           *(["--per_class", "3"] if smoke else [])], log)  # fmt: skip
    s1_sum = json.loads((s1 / "train_summary.json").read_text())
    s2_sum = json.loads((s2 / "train_summary.json").read_text())
    result = {
        "recipe": name,
        "stage1_overrides": s1_over,
        "stage2_overrides": s2_over,
        "stage1_validation": s1_sum["validation"],
        "stage2_validation": s2_sum["validation"],
        "seconds": t,
        "quality": json.loads((q / "quality.json").read_text()),
    }
    (d / "result.json").write_text(json.dumps(result, indent=2))
    return result


def summary_line(r: dict) -> str:
    q = r["quality"]
    if "rows" in q:  # a sweep: docs/quality.md's rule, the lowest ratio among settings recognised >= 97%
        ok = [row for row in q["rows"] if row["recognised_as_asked"] >= 0.97] or q["rows"]
        best = min(ok, key=lambda row: row["frechet_distance_ratio"])
    else:
        best = q
    return (f"| {r['recipe']} | {r['stage1_validation']['psnr']:.2f} | {r['stage1_validation']['usage']:.0%} | "
            f"{r['stage2_validation']['bits_per_code']:.3f} | {best['recognised_as_asked']:.1%} | "
            f"{best['frechet_distance_ratio']:.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a few steps of each: the plumbing, not figures")
    parser.add_argument("--output_dir", default=str(ROOT / "runs" / "recipes"))
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The judge's classifier and the MNIST cache are made once, before the runs race for them.
    from stage2_prior.quality import Judge

    Judge("validation")
    names = args.recipes.split(",")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, args.parallel))))
    print("| recipe | val PSNR | usage | val bits/code | recognised | FD ratio (val) |\n|---|---|---|---|---|---|")
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {n: pool.submit(one, n, out, args.sweep, args.smoke) for n in names}
        for n, f in futures.items():
            try:
                print(summary_line(f.result()), flush=True)
            except Exception as e:  # one failed recipe must not cost the others
                print(f"| {n} | FAILED: {e} |", flush=True)


if __name__ == "__main__":
    main()
