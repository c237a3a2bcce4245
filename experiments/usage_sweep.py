"""Stage 1 alone at the demo's budget for quantizer variants: test-split codebook usage, perplexity and PSNR.

    python -m experiments.usage_sweep --jobs 8 --seeds 0 1 --variants fsq888,fsq8444

Runs variants in parallel (each a `stage1_vqvae.train` + `stage1_vqvae.evaluate` subprocess), prints a table.
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
FSQ = ["model.quantizer=fsq", "model.decay=null", "model.kmeans_init=false", "model.dead_code_window=0"]
SIMVQ = ["model.codebook_transform=linear", "model.decay=null", "model.kmeans_init=false", "model.dead_code_window=0"]
VARIANTS = {
    "fsq888": FSQ + ["model.fsq_levels=[8,8,8]"],
    "fsq8444": FSQ + ["model.fsq_levels=[8,4,4,4]"],
    "fsq8842": FSQ + ["model.fsq_levels=[8,8,4,2]"],
    "fsq5554": FSQ + ["model.fsq_levels=[5,5,5,4]"],
    "fsq44442": FSQ + ["model.fsq_levels=[4,4,4,4,2]"],
    "fsq2x9": FSQ + ["model.fsq_levels=[2,2,2,2,2,2,2,2,2]"],
    "simvq": SIMVQ,
    "simvq_d8": SIMVQ + ["model.lookup_dim=8"],
    "simvq_d16": SIMVQ + ["model.lookup_dim=16"],
    "simvq_l2": SIMVQ + ["model.l2_normalize=true"],
    "simvq_lr5e-4": SIMVQ + ["train.learning_rate=5.0e-4"],
}


def one(name: str, seed: int, work: Path, threads: int, extra: list[str]) -> dict:
    overrides = VARIANTS[name]
    out = work / f"{name}-seed{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    commands = (
        ["-m", "stage1_vqvae.train", "--config", "mnist/stage1", "--output_dir", str(out / "s1"),
         "--overwrite_output_dir", f"train.seed={seed}", "train.report_to=none", "train.checkpoint_every=0",
         *overrides, *extra],
        ["-m", "stage1_vqvae.evaluate", "--model", str(out / "s1" / "model"), "--output_dir", str(out / "e1")],
    )  # fmt: skip
    with open(work / f"{name}-seed{seed}.log", "w") as log:  # each run's output, kept apart from the others'
        for cmd in commands:
            subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    e1 = json.loads((out / "e1" / "metrics.json").read_text())
    return {"variant": name, "seed": seed, "psnr": e1["psnr"], "usage": e1["usage"], "perplexity": e1["perplexity"],
            "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run (e.g. a short smoke)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "usage_sweep"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for s in args.seeds for v in args.variants.split(",")]
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, v, s, work, args.threads, args.extra) for v, s in todo]
        for f in futures:
            try:
                r = f.result()
            except subprocess.CalledProcessError as err:
                print("FAILED", err, flush=True)
                continue
            results.append(r)
            (work / "results.json").write_text(json.dumps(results, indent=2))
            print(f"| {r['variant']} | {r['seed']} | {r['psnr']:.2f} | {r['usage']:.1%} | {r['perplexity']:.0f} | "
                  f"{r['wall_s']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
