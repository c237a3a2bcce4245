"""`make bench`: speed figures as ratios against baselines measured in the same run (these machines are noisy).

    python -m benchmarks.run [--only quantizer,stage1,vqgan,stage2,sampling,jacobi,extraction,demo,metrics,app,app-load]
        [--repeats 7]

Every timing is the median of interleaved repeats. The reference rate is the fp32 rate of a 2048^3 torch.mm,
timed interleaved with each benchmark's own calls; FLOPs are counted with torch.utils.flop_counter. Prints a
markdown table; paste it into docs/benchmarks.md with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import ROOT, demo_codes_meta, flops_of, reference_rate, row, timeit, timeit_with_rate
from benchmarks.sampling import bench_jacobi, bench_sampling

# --------------------------------------------------------------------------------------------------


def bench_quantizer(repeats: int) -> None:
    from stage1_vqvae.quantizers import VectorQuantizer

    n, d, k = 8192, 64, 512
    torch.manual_seed(0)
    ours = VectorQuantizer(k, d, commitment_weight=0.25, decay=0.99).train()
    # (B, D, h, w): 8*32*32 = 8192 vectors, channels_last as the encoder hands them over in training
    z = torch.randn(8, d, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()

    def run_ours():
        out = ours(z)
        (out.loss + out.z_q.sum() * 0).backward()
        out.perplexity.item()

    fns = {"ours": run_ours}
    try:
        from vector_quantize_pytorch import VectorQuantize

        theirs = VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25).train()
        x = torch.randn(8, 1024, d, requires_grad=True)  # (B, N, D)

        def run_theirs():
            q, idx, loss = theirs(x)
            (loss.sum() + q.sum() * 0).backward()

        fns["vector_quantize_pytorch"] = run_theirs
    except ImportError:
        print("vector_quantize_pytorch is not installed: pip install vector-quantize-pytorch", file=sys.stderr)
    t, rate = timeit_with_rate(fns, repeats)
    gemm = 2 * n * d * k / rate
    if "vector_quantize_pytorch" in t:
        row(
            "quantizer fwd+bwd, EMA + stats (N=8192, D=64, K=512)",
            f"{t['vector_quantize_pytorch'] / t['ours']:.2f}x faster than vector_quantize_pytorch",
            ">= 4x",
            f"ours {t['ours'] * 1e3:.2f} ms, theirs {t['vector_quantize_pytorch'] * 1e3:.2f} ms",
        )
    row(
        "quantizer vs its distance GEMM",
        f"{t['ours'] / gemm:.2f}x the GEMM time",
        "<= 2x",
        f"GEMM floor {gemm * 1e3:.2f} ms at the reference rate",
    )


def bench_quantizer_options(repeats: int) -> None:
    """Each quantizer option's fwd+bwd at the same N, D, K as the paper's VQ (loss-mode codebook, no EMA)."""
    from stage1_vqvae.quantizers import FiniteScalarQuantizer, VectorQuantizer

    d, k = 64, 512
    torch.manual_seed(0)
    z = torch.randn(8, d, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()  # N = 8192
    quantizers = {
        "paper VQ": VectorQuantizer(k, d, decay=None),
        "l2 + lookup_dim 8": VectorQuantizer(k, d, decay=None, lookup_dim=8, l2_normalize=True),
        "rotation trick": VectorQuantizer(k, d, decay=None, straight_through="rotation"),
        "SimVQ": VectorQuantizer(k, d, decay=None, codebook_transform="linear"),
        "SimVQ + lookup_dim 8 (the ablation's)": VectorQuantizer(
            k, d, decay=None, codebook_transform="linear", lookup_dim=8
        ),
    }

    def step(q, x):
        out = q.train()(x)
        (out.loss + out.z_q.sum()).backward()

    fns = {name: (lambda q=q: step(q, z)) for name, q in quantizers.items()}
    fsq_z = torch.randn(8, 4, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    fns["FSQ levels [8, 8, 4, 2] (K=512, D=4, no distance GEMM; the ablation's)"] = lambda: step(
        FiniteScalarQuantizer([8, 8, 4, 2]), fsq_z
    )
    t = timeit(fns, repeats)
    for name, seconds in t.items():
        if name != "paper VQ":
            row(
                f"quantizer option: {name}, fwd+bwd (N=8192, K=512)",
                f"{seconds / t['paper VQ']:.2f}x the paper VQ's time",
                "(measured; the paper's path is unchanged)",
                f"{seconds * 1e3:.2f} ms vs {t['paper VQ'] * 1e3:.2f} ms",
            )


def bench_stage1(repeats: int) -> None:
    from stage1_vqvae.model import VQVAE
    from stage1_vqvae.train import Stage1Config
    from vqgen.config import load_config

    cfg = load_config(Stage1Config, ROOT / "configs" / "mnist" / "stage1.yaml", [])
    model = VQVAE(cfg.model).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    b = cfg.train.batch_size
    x = (torch.rand(b, 1, 28, 28) * 2 - 1).contiguous(memory_format=torch.channels_last)

    def step():
        out = model(x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.item()

    flops = flops_of(lambda: model(x).loss.backward())
    t, rate = timeit_with_rate({"step": step}, repeats)
    t = t["step"]
    row(
        "stage-1 training step (demo config, batch 128)",
        f"{flops / t / rate:.0%} of the matmul rate",
        ">= 60%",
        f"{b / t:.0f} img/s, {flops / t / 1e9:.1f} GFLOP/s, {t * 1e3:.0f} ms/step",
    )


def bench_stage2(repeats: int) -> None:
    from stage2_prior.model import TokenLayout, build_prior, labels_for
    from stage2_prior.train import Stage2Config, param_groups
    from vqgen.config import load_config

    cfg = load_config(Stage2Config, ROOT / "configs" / "mnist" / "stage2.yaml", [])
    layout = TokenLayout(256, 10, 7, 7)
    model = build_prior(cfg.model, layout, demo_codes_meta(), "bench").train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    ids = torch.randint(0, 256, (cfg.train.batch_size, layout.seq_len))
    labels = labels_for(ids)

    def step():
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.item()

    flops = flops_of(lambda: model(input_ids=ids, labels=labels).loss.backward())
    t, rate = timeit_with_rate({"step": step}, repeats)
    t = t["step"]
    tokens = ids.numel()
    row(
        "stage-2 training step (demo config, batch 64 x 51 tokens)",
        f"{flops / t / rate:.0%} of the matmul rate",
        ">= 40%",
        f"{tokens / t:.0f} tokens/s, {flops / t / 1e9:.1f} GFLOP/s",
    )


def bench_extraction(repeats: int) -> None:
    """Peak RSS of extracting the MNIST test split and the same split repeated 10 times (must not grow)."""
    import datasets

    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.model import VQVAE, VQVAEConfig
    from stage1_vqvae.sources import load_source

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        test = load_source(DataConfig())["test"]
        for name, reps in (("x1", 1), ("x10", 10)):
            ds = datasets.concatenate_datasets([test] * reps)
            datasets.DatasetDict(
                {"train": ds, "validation": test.select(range(10)), "test": test.select(range(10))}
            ).save_to_disk(str(tmp / name))
        model = VQVAE(VQVAEConfig(hidden_channels=64, res_channels=32, codebook_size=256, codebook_dim=32))
        model.save_pretrained(tmp / "vq")
        (tmp / "vq" / "data_config.json").write_text(json.dumps({"source": "mnist"}))
        results = {}
        for name in ("x1", "x10"):
            cmd = [sys.executable, "-m", "benchmarks.extract_rss", "--model", str(tmp / "vq")]
            cmd += ["--output_dir", str(tmp / f"codes_{name}"), f"data.source={tmp / name}"]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"extraction failed:\n{out.stderr[-2000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        x1, x10 = results["x1"], results["x10"]
        row(
            "extraction (MNIST test split vs the same x10)",
            f"peak heap (RssAnon) {x10['peak_anon_mib']:.0f} MiB (x10) vs {x1['peak_anon_mib']:.0f} MiB (x1)",
            "must not grow",
            f"{(len(test) + 20) / x1['seconds']:.0f} img/s (x1), {(10 * len(test) + 20) / x10['seconds']:.0f} img/s "
            f"(x10); peak RSS {x10['peak_rss_mib']:.0f} vs {x1['peak_rss_mib']:.0f} MiB, of which mapped files "
            f"{x10['peak_file_mib']:.0f} vs {x1['peak_file_mib']:.0f} MiB (the Arrow source read through mmap)",
        )


def bench_demo() -> None:
    path = ROOT / "runs" / "demo" / "metrics.json"
    if not path.is_file():
        print("no runs/demo/metrics.json: run `make demo` first for the demo's wall time", file=sys.stderr)
        return
    t = json.loads(path.read_text())["wall_time_s"]
    row(
        "demo wall time per stage (s)",
        f"total {t['total']}",
        "<= 900 s",
        ", ".join(f"{k} {v}" for k, v in t.items() if k != "total"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="quantizer,stage1,vqgan,stage2,sampling,jacobi,extraction,demo,metrics,app,"
                        "app-load")  # fmt: skip
    parser.add_argument("--metrics_images", type=int, default=None,
                        help="images per set of the metrics row (default: 10000 on a GPU, 1000 on a CPU)")  # fmt: skip
    parser.add_argument("--pipeline", default=str(ROOT / "runs" / "demo" / "pipeline"), help="a trained pipeline")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    which = set(args.only.split(","))
    torch.manual_seed(0)
    rate = reference_rate(args.repeats)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; reference fp32 matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s\n"
    )
    print("| what | figure | target | detail |\n|---|---|---|---|")
    if "quantizer" in which:
        bench_quantizer(args.repeats)
        bench_quantizer_options(args.repeats)
    if "stage1" in which:
        bench_stage1(args.repeats)
    if "vqgan" in which:  # the vqgan network next to diffusers' VQModel at 64 and 256 px (benchmarks/vqgan.py)
        from benchmarks.vqgan import bench as bench_vqgan

        bench_vqgan(min(args.repeats, 5), row)
    if "stage2" in which:
        bench_stage2(args.repeats)
    if "sampling" in which:
        bench_sampling(args.repeats)
    if "jacobi" in which:
        bench_jacobi(args.repeats, args.pipeline)
    if "extraction" in which:
        bench_extraction(args.repeats)
    if "demo" in which:
        bench_demo()
    if "metrics" in which:  # vqgen.metrics against torch-fidelity on the same images (benchmarks/metrics.py)
        from benchmarks.metrics import bench as bench_metrics

        n = args.metrics_images or (10000 if torch.cuda.is_available() else 1000)
        bench_metrics(n, 100, None, row=row)
    if "app" in which:  # the Gradio page on the demo pipeline: start and a 10-image grid (benchmarks/app.py)
        from benchmarks.app import bench as bench_app

        if (Path(args.pipeline) / "pipeline.json").is_file():
            bench_app(args.pipeline, args.repeats, row)
        else:
            print(f"no pipeline at {args.pipeline}: run `make demo` first for the app's rows", file=sys.stderr)
    if "app-load" in which and (Path(args.pipeline) / "pipeline.json").is_file():  # many visitors at once
        from benchmarks.app_load import bench as bench_app_load

        bench_app_load(args.pipeline, [1, 4, 16, 32], 3, row)
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
