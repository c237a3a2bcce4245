"""`make bench-data`: memory and throughput of stage 1 and extraction at real sizes (issue: users' own data).

    python -m benchmarks.data_scale [--only train_rss,extract,throughput,configs] [--steps 200]

- train_rss: peak memory of stage-1 training on MNIST resized to 128x128 and 256x256 RGB, decoding on the fly
  (the default once the decoded splits exceed data.cache_max_gb) against decoding everything into memory first
  (data.cache_max_gb=100, the old behaviour) at 128.
- extract: peak memory of extracting 70k images (MNIST) and 620k (its train split 12 times); then a kill -9
  halfway through the 620k extraction, the same command again, and a row-for-row comparison with the
  uninterrupted result.
- throughput: stage-1 images/s on the same MNIST images, in memory vs decoded on the fly vs streamed.
- configs: seconds per step and memory of configs/celeba64, ffhq256 and imagenet256-f16 on this CPU at batch 8.

Every command runs in a child process; a sampler thread polls the whole process tree (the trainer and its
DataLoader workers) every 20 ms, from /proc/PID/status. "tree RSS" sums the processes' resident sets (pages
shared between a parent and its forked workers are counted in each, so it is an upper bound); "main RSS" is the
trainer or extractor alone; "heap" is RssAnon, the anonymous memory (buffers, tensors) without the pages of
memory-mapped Arrow files, which the kernel can drop at will and which grow with what has been read.
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench_data"
ROWS: list[tuple[str, str, str, str]] = []
GIB = 2**30


def row(what: str, figure: str, target: str, detail: str) -> None:
    ROWS.append((what, figure, target, detail))
    print(f"| {what} | {figure} | {target} | {detail} |", flush=True)


def run_sampled(cmd: list[str], kill_when=None) -> dict:
    """Run cmd, sampling the tree's memory; `kill_when()` true -> SIGKILL the whole tree (a crash)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree_rss": 0, "main_rss": 0, "tree_anon": 0, "main_anon": 0}
    killed = False
    stop = threading.Event()

    def status(pid: int) -> tuple[int, int]:
        """(VmRSS, RssAnon) in bytes: anon is the heap, without the mapped files the kernel may drop."""
        text = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if line.startswith(("VmRSS", "RssAnon")))
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024

    def sample() -> None:
        nonlocal killed
        main = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [main, *main.children(recursive=True)]
                rss = anon = 0
                for p in procs:
                    try:
                        r, a = status(p.pid)
                    except (OSError, KeyError, ValueError):
                        continue
                    rss, anon = rss + r, anon + a
                    if p is main:
                        peak["main_rss"], peak["main_anon"] = max(peak["main_rss"], r), max(peak["main_anon"], a)
                peak["tree_rss"], peak["tree_anon"] = max(peak["tree_rss"], rss), max(peak["tree_anon"], anon)
                if kill_when is not None and not killed and kill_when():
                    for p in procs:
                        try:
                            p.send_signal(signal.SIGKILL)
                        except psutil.Error:
                            pass
                    killed = True
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0 and not killed:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {**{k: v / GIB for k, v in peak.items()}, "seconds": time.perf_counter() - t0, "killed": killed}


def stage1(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "stage1_vqvae.train", "--config", "mnist/stage1", "--output_dir", str(out),
            "--overwrite_output_dir", "train.report_to=none", "train.eval_every=0", "train.checkpoint_every=0",
            *overrides]  # fmt: skip


def gib(x: float) -> str:
    return f"{x:.2f} GiB"


def bench_train_rss(steps: int) -> None:
    common = ["data.channels=RGB", f"train.max_steps={steps}", "train.eval_max_batches=2"]
    accum = ["train.gradient_accumulation_steps=2"]
    for name, batch, extra in (
        ("128 on the fly", 32, ["data.resolution=128", "model.downsample=8"]),
        ("256 on the fly", 32, ["data.resolution=256", "model.downsample=16"]),
        ("256 on the fly, 2 micro-batches of 16", 32, ["data.resolution=256", "model.downsample=16", *accum]),
        ("256 on the fly", 16, ["data.resolution=256", "model.downsample=16"]),
        ("128 on the fly, the demo's f=4 (32x32 codes)", 128, ["data.resolution=128"]),
        ("128 in memory (the old path)", 32, ["data.resolution=128", "model.downsample=8", "data.cache_max_gb=100"]),
    ):
        r = run_sampled(stage1(WORK / "rss", *common, f"train.batch_size={batch}", *extra))
        row(
            f"stage-1 training, MNIST at {name}, batch {batch}",
            f"peak main RSS {gib(r['main_rss'])}",
            "<= 1.5 GiB (on the fly)",
            f"tree (trainer + 2 workers) RSS {gib(r['tree_rss'])}, heap (RssAnon) {gib(r['tree_anon'])}; "
            f"{steps} steps + validation, {r['seconds']:.0f} s wall incl. start-up",
        )


def build_sources() -> tuple[Path, Path]:
    """MNIST as save_to_disk folders: x1 (50k/10k/10k) and x12 (the train split 12 times: 600k/10k/10k)."""
    import datasets

    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.sources import load_source

    dd = load_source(DataConfig())
    paths = []
    for name, reps in (("x1", 1), ("x12", 12)):
        path = WORK / f"mnist_{name}"
        if not (path / "dataset_dict.json").is_file():
            train = datasets.concatenate_datasets([dd["train"]] * reps)
            datasets.DatasetDict({"train": train, "validation": dd["validation"], "test": dd["test"]}).save_to_disk(
                str(path)
            )
        paths.append(path)
    return paths[0], paths[1]


def bench_extract() -> None:
    from stage1_vqvae.model import VQVAE, VQVAEConfig

    x1, x12 = build_sources()
    vq = WORK / "vq"
    if not (vq / "model.safetensors").is_file():
        VQVAE(VQVAEConfig(hidden_channels=64, res_channels=32, codebook_size=512, codebook_dim=64)).save_pretrained(vq)
        (vq / "data_config.json").write_text(json.dumps({"source": "mnist"}))

    def extract(src: Path, out: Path, kill_when=None) -> dict:
        cmd = [sys.executable, "-m", "stage1_vqvae.extract", "--model", str(vq), "--output_dir", str(out)]
        return run_sampled([*cmd, f"data.source={src}"], kill_when)

    for out in ("codes_x1", "codes_x12", "codes_killed"):
        shutil.rmtree(WORK / out, ignore_errors=True)
        shutil.rmtree(WORK / f".{out}.work", ignore_errors=True)
    r1 = extract(x1, WORK / "codes_x1")
    r12 = extract(x12, WORK / "codes_x12")
    growth = r12["main_anon"] / r1["main_anon"] - 1
    row(
        "extraction, 70k vs 620k images",
        f"peak main heap (RssAnon) {r12['main_anon'] * 1024:.0f} vs {r1['main_anon'] * 1024:.0f} MiB ({growth:+.1%})",
        "flat (+-5%)",
        f"peak main RSS {gib(r12['main_rss'])} vs {gib(r1['main_rss'])} (RSS includes the mmapped Arrow pages read); "
        f"tree heap {gib(r12['tree_anon'])} vs {gib(r1['tree_anon'])}; "
        f"{620_000 / r12['seconds']:.0f} vs {70_000 / r1['seconds']:.0f} img/s incl. start-up",
    )
    # kill -9 once half of the 620k rows' shards (62 of 63 shards of 10k) are complete, then the same command.
    work = WORK / ".codes_killed.work"
    rk = extract(x12, WORK / "codes_killed", kill_when=lambda: len(list(work.glob("*/shard-*.parquet"))) >= 31)
    kept = len(list(work.glob("*/shard-*.parquet")))
    rr = extract(x12, WORK / "codes_killed")
    equal = compare_codes(WORK / "codes_x12", WORK / "codes_killed")
    row(
        "extraction killed (-9) halfway, then run again",
        f"result equals the uninterrupted one row for row: {equal}",
        "equal",
        f"killed after {rk['seconds']:.0f} s with {kept} of 63 shards complete; the second run took "
        f"{rr['seconds']:.0f} s against {r12['seconds']:.0f} s for a whole run",
    )


def compare_codes(a: Path, b: Path) -> bool:
    import numpy as np

    from vqgen.codes import load_code_dataset

    da, ma = load_code_dataset(a)
    db, mb = load_code_dataset(b)
    if ma.codes_fingerprint != mb.codes_fingerprint or set(da) != set(db):
        return False
    for split in da:
        x, y = da[split].with_format("numpy"), db[split].with_format("numpy")
        for lo in range(0, len(x), 100_000):
            if not np.array_equal(x[lo : lo + 100_000]["codes"], y[lo : lo + 100_000]["codes"]):
                return False
    return True


def bench_throughput(steps: int) -> None:
    """The demo's stage 1 on the same MNIST images: in memory, decoded on the fly (workers), streamed."""
    common = [f"train.max_steps={steps}", "train.log_every=1000000"]
    variants = {
        "in memory": [],
        "on the fly, 1 worker": ["data.cache_max_gb=0", "train.num_workers=1"],
        "streamed, 1 worker": ["data.streaming=true", "train.num_workers=1"],
    }
    rates = {k: [] for k in variants}
    for _ in range(2):  # interleaved repeats: the machine's speed drifts
        for name, extra in variants.items():
            run_sampled(stage1(WORK / "tp", *common, *extra))
            summary = json.loads((WORK / "tp" / "train_summary.json").read_text())
            rates[name].append(summary["images_per_s"])
    base = max(rates["in memory"])
    for name, r in rates.items():
        row(
            f"stage-1 img/s, MNIST demo config, {name}",
            f"{max(r):.0f} img/s ({max(r) / base:.0%} of in memory)",
            ">= 80% of in memory" if name != "in memory" else "baseline",
            f"best of 2 interleaved runs of {steps} steps (runs: {', '.join(f'{x:.0f}' for x in r)})",
        )


def bench_configs(steps: int) -> None:
    """The face configs' step on this CPU at batch 8, on MNIST resized to their resolution (their Hub datasets
    are out of reach offline), with the discriminator on from step 0 and the perceptual term off (no VGG16
    weights here): seconds per step and peak memory, to scale from."""
    for name in ("celeba64", "ffhq256", "imagenet256-f16"):
        out = WORK / f"cfg_{name}"
        cmd = [sys.executable, "-m", "stage1_vqvae.train", "--config", f"{name}/stage1", "--output_dir", str(out),
               "--overwrite_output_dir", "data.source=mnist", "train.report_to=none", "train.eval_every=0",
               "train.checkpoint_every=0", "train.batch_size=8", f"train.max_steps={steps}", "train.num_workers=1",
               "loss.perceptual_weight=0", "loss.disc_start=0", "train.eval_max_batches=1",
               "data.streaming=false"]  # fmt: skip
        r = run_sampled(cmd)
        summary = json.loads((out / "train_summary.json").read_text())
        from safetensors.torch import load_file

        params = sum(t.numel() for t in load_file(str(out / "model" / "model.safetensors")).values())
        row(
            f"configs/{name}: a step at batch 8 (CPU)",
            f"{8 / summary['images_per_s']:.2f} s/step, {summary['images_per_s']:.1f} img/s",
            "documented",
            f"peak main RSS {gib(r['main_rss'])}, heap {gib(r['main_anon'])}; VQ-VAE {params / 1e6:.1f}M parameters; "
            f"discriminator on, perceptual off; {steps} steps",
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="train_rss,extract,throughput,configs")
    parser.add_argument("--steps", type=int, default=200, help="training steps per throughput run")
    parser.add_argument("--rss_steps", type=int, default=20, help="training steps per memory run")
    parser.add_argument("--config_steps", type=int, default=6, help="training steps per face-config run")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    print("| benchmark | figure | target | detail |\n|---|---|---|---|", flush=True)
    only = args.only.split(",")
    if "train_rss" in only:
        bench_train_rss(args.rss_steps)
    if "extract" in only:
        bench_extract()
    if "throughput" in only:
        bench_throughput(args.steps)
    if "configs" in only:
        bench_configs(args.config_steps)


if __name__ == "__main__":
    main()
