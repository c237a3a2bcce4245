"""The quantizer ablation: each option carried through stage 1 -> extraction -> prior -> samples on MNIST, at the
demo's budget (its configs, its steps), with the same seeds, everything else equal.

    make ablation                                   # = python -m experiments.ablation
    python -m experiments.ablation --options vq,fsq --seeds 0 1 --output_dir runs/ablation

Each run uses the CLIs as a user would (the demo's `run_step`) and appends its figures to
OUTPUT_DIR/results.json as soon as it ends, so an interrupted ablation keeps what it measured; a rerun skips the
runs already there. docs/ablation.md is written from results.json: per run and as the mean over seeds.
Sample quality is `stage2_prior.quality` on the test split (1000 samples, the pipeline's own settings).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from stage2_prior.demo import run_step

ROOT = Path(__file__).resolve().parent.parent
# Each option at the setting that reached the usage target in the stage-1 sweep (`experiments.usage_sweep`,
# docs/ablation.md "Choosing each option's setting"): FSQ [8, 8, 8] and SimVQ over the full 64 dimensions used
# 90-94% and 75-95% of their codes, [8, 8, 4, 2] and SimVQ in an 8-dim lookup space 89-100% and 100%.
OPTIONS = {
    "vq": [],  # the paper's quantizer, as the demo trains it
    "fsq": ["model.quantizer=fsq", "model.fsq_levels=[8,8,4,2]", "model.decay=null", "model.kmeans_init=false"],
    "l2_lookup8": ["model.lookup_dim=8", "model.l2_normalize=true"],
    "rotation": ["model.straight_through=rotation"],
    "simvq_lookup8": [
        "model.codebook_transform=linear",
        "model.lookup_dim=8",
        "model.decay=null",
        "model.kmeans_init=false",
    ],
}
NO_RESTARTS = {"fsq", "simvq_lookup8"}  # no codebook to restart (FSQ) or a frozen one (SimVQ)


def one_run(name: str, seed: int, out: Path) -> dict:
    t: dict = {}
    s1, s2, codes, pipe = out / "stage1", out / "stage2", out / "codes", out / "pipeline"
    extra = OPTIONS[name] + (["model.dead_code_window=0"] if name in NO_RESTARTS else [])
    t0 = time.perf_counter()
    run_step("stage 1", ["-m", "stage1_vqvae.train", "--config", "mnist/stage1", "--output_dir", s1,
                         f"train.seed={seed}", "train.report_to=none", *extra], t)  # fmt: skip
    run_step("stage 1 eval", ["-m", "stage1_vqvae.evaluate", "--model", s1 / "model", "--output_dir", out / "e1"], t)
    run_step("extraction", ["-m", "stage1_vqvae.extract", "--model", s1 / "model", "--output_dir", codes], t)
    run_step("stage 2", ["-m", "stage2_prior.train", "--config", "mnist/stage2", "--output_dir", s2,
                         f"data.codes={codes}", f"train.seed={seed}", "train.report_to=none"], t)  # fmt: skip
    run_step("stage 2 eval", ["-m", "stage2_prior.evaluate", "--prior", s2 / "model", "--output_dir", out / "e2"], t)
    run_step("export", ["-m", "stage2_prior.export", "--vqvae", s1 / "model", "--prior", s2 / "model",
                        "--output_dir", pipe], t)  # fmt: skip
    run_step("samples", ["-m", "stage2_prior.quality", "--pipeline", pipe, "--split", "test",
                         "--seed", str(seed), "--output_dir", out / "q"], t)  # fmt: skip
    e1 = json.loads((out / "e1" / "metrics.json").read_text())
    e2 = json.loads((out / "e2" / "metrics.json").read_text())
    q = json.loads((out / "q" / "quality.json").read_text())
    return {
        "option": name,
        "seed": seed,
        "psnr": e1["psnr"],
        "usage": e1["usage"],
        "perplexity": e1["perplexity"],
        "bits_per_code": e2["bits_per_code"],
        "two_stage_bits_per_dim": e2["two_stage"]["bits_per_dim"],
        "recognised": q["recognised_as_asked"],
        "fd_ratio": q["frechet_distance_ratio"],
        "kid": q["kid"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def table(results: list[dict]) -> str:
    cols = ("psnr", "usage", "perplexity", "bits_per_code", "two_stage_bits_per_dim", "recognised", "fd_ratio")
    head = "| option | seeds | PSNR (dB) | usage | perplexity | bits/code | two-stage bpd | recognised | FD ratio |"
    lines = [head + " wall (s) |", "|" + "---|" * 10]
    for name in OPTIONS:
        runs = [r for r in results if r["option"] == name]
        if not runs:
            continue
        mean = {c: statistics.mean(r[c] for r in runs) for c in (*cols, "wall_s")}
        spread = {c: (max(r[c] for r in runs) - min(r[c] for r in runs)) / 2 for c in cols}
        lines.append(
            f"| {name} | {','.join(str(r['seed']) for r in runs)} | {mean['psnr']:.2f} +- {spread['psnr']:.2f} | "
            f"{mean['usage']:.1%} | {mean['perplexity']:.0f} | {mean['bits_per_code']:.3f} | "
            f"{mean['two_stage_bits_per_dim']:.3f} | {mean['recognised']:.1%} | "
            f"{mean['fd_ratio']:.2f} +- {spread['fd_ratio']:.2f} | {mean['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output_dir", default=str(ROOT / "runs" / "ablation"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "ablation_table.md"), help="the table, written each run")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    for seed in args.seeds:  # seeds outermost: a cut-short ablation still has every option once
        for name in args.options.split(","):
            if any(r["option"] == name and r["seed"] == seed for r in results):
                continue
            results.append(one_run(name, seed, out / f"{name}-seed{seed}"))
            results_file.write_text(json.dumps(results, indent=2))
            Path(args.doc).write_text(table(results))
            print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
