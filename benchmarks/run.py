"""`make bench`: speed figures as ratios against baselines measured in the same run (these machines are noisy).

    python -m benchmarks.run [--only quantizer,stage1,vqgan,stage2,sampling,jacobi,extraction,demo,metrics,app]
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
ROWS: list[tuple[str, str, str, str]] = []


def timeit(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each fn, calls interleaved so drifts in machine speed hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


REF_A, REF_B = torch.randn(2048, 2048), torch.randn(2048, 2048)


def ref_mm() -> None:
    torch.mm(REF_A, REF_B)


def timeit_with_rate(fns: dict, repeats: int, warmup: int = 2) -> tuple[dict, float]:
    """timeit plus the fp32 matmul rate measured interleaved with the same calls (FLOP/s)."""
    t = timeit({**fns, "_ref": ref_mm}, repeats, warmup)
    return t, 2 * 2048**3 / t.pop("_ref")


def reference_rate(repeats: int) -> float:
    return timeit_with_rate({}, repeats)[1]


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def row(what: str, figure: str, target: str, detail: str) -> None:
    ROWS.append((what, figure, target, detail))
    print(f"| {what} | {figure} | {target} | {detail} |", flush=True)


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


def demo_codes_meta():
    """The CodesMeta of MNIST codes at the demo's geometry (7x7 grids, K=256, 10 classes)."""
    from vqgen.codes import CodesMeta

    return CodesMeta(
        codebook_size=256,
        height=7,
        width=7,
        image_size=28,
        channels=1,
        class_names=[str(i) for i in range(10)],
        splits={},
        source="mnist",
        data_config={},
        vqvae_fingerprint="0" * 64,
        vqvae_location=None,
        codes_fingerprint="0" * 64,
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


def bench_sampling(repeats: int) -> None:
    from transformers import LogitsProcessor, LogitsProcessorList

    from stage2_prior.model import TokenLayout, build_prior, prefix_ids
    from stage2_prior.sampling import CACHE, sample_codes
    from stage2_prior.train import Stage2Config
    from vqgen.config import load_config

    cfg = load_config(Stage2Config, ROOT / "configs" / "mnist" / "stage2.yaml", [])
    layout = TokenLayout(256, 10, 7, 7)
    model = build_prior(cfg.model, layout, demo_codes_meta(), "bench").eval()
    classes = torch.arange(10).repeat_interleave(10)
    n = len(classes)

    class OnlyCodes(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, layout.codebook_size :] = float("-inf")
            return scores

    prompt = prefix_ids(layout, n, classes)
    ones = torch.ones_like(prompt)

    def hf(guided: bool):
        extra = {}
        if guided:
            neg = prefix_ids(layout, n, None)
            extra = dict(guidance_scale=3.0, negative_prompt_ids=neg, negative_prompt_attention_mask=ones)
        model.generate(
            prompt,
            attention_mask=ones,
            do_sample=True,
            max_new_tokens=layout.num_codes,
            min_new_tokens=layout.num_codes,
            logits_processor=LogitsProcessorList([OnlyCodes()]),
            **extra,
        )

    def ours(guided: bool, compile: bool = False):
        scale = 3.0 if guided else 1.0
        sample_codes(model, n, classes=classes, guidance_scale=scale, generator=torch.Generator().manual_seed(0),
                     compile=compile)  # fmt: skip

    def forwards_only(guided: bool):
        """The same forward calls with nothing around them: the bound of any loop over this model's forward."""
        ids = torch.cat([prompt, prefix_ids(layout, n, None)]) if guided else prompt
        token = torch.zeros(len(ids), 1, dtype=torch.long)
        out = model(input_ids=ids, use_cache=True)
        for _ in range(layout.num_codes - 1):
            out = model(input_ids=token, use_cache=True, **{CACHE: getattr(out, CACHE)})

    params = sum(p.numel() for p in model.parameters())
    # A fresh inductor cache, so that the compile time below is what a user's first run pays.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vqgen-bench-inductor-")
    for guided in (False, True):
        t0 = time.perf_counter()
        ours(guided, compile=True)  # the one-off compilation, timed apart from the steady state below
        first_compiled = time.perf_counter() - t0
        t, rate = timeit_with_rate(
            {
                "ours": lambda g=guided: ours(g),
                "compiled": lambda g=guided: ours(g, compile=True),
                "generate": lambda g=guided: hf(g),
                "forwards": lambda g=guided: forwards_only(g),
            },
            max(3, repeats // 2),
            warmup=1,
        )
        floor = 2 * params * n * layout.num_codes * (2 if guided else 1) / rate
        row(
            f"sampling 100 class-conditional images{' with guidance 3' if guided else ''}",
            f"{t['generate'] / t['ours']:.2f}x faster than generate()",
            ">= 2x",
            f"ours {n / t['ours']:.0f} img/s, generate {n / t['generate']:.0f} img/s; "
            f"{t['ours'] / floor:.1f}x the compute floor (target <= 1.5x); the transformers forward calls alone: "
            f"{t['forwards'] * 1e3:.0f} ms = {t['generate'] / t['forwards']:.2f}x faster than generate(), "
            f"{t['forwards'] / floor:.1f}x the floor",
        )
        row(
            f"the same with `compile=True` (`sample.py --compile`){', guidance 3' if guided else ''}",
            f"{t['generate'] / t['compiled']:.2f}x faster than generate()",
            ">= 2x",
            f"{n / t['compiled']:.0f} img/s once compiled, {t['compiled'] / floor:.1f}x the compute floor; the first "
            f"call compiled for {first_compiled:.0f} s with a cold cache (it pays after "
            f"~{first_compiled / (t['ours'] - t['compiled']):.0f} batches of {n})",
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


def forward_cost(prior, rows: int, tokens: int, prefix: int, repeats: int) -> float:
    """Median seconds of one prior forward carrying `tokens` new tokens per row, over a KV cache of `prefix`
    tokens, for `rows` rows (guidance doubles them); the cache is cropped back after every call."""
    from stage2_prior.sampling import CACHE

    ids = torch.randint(0, prior.config.vocab_size, (rows, prefix + tokens))
    with torch.no_grad():
        cache = getattr(prior(input_ids=ids[:, :prefix], use_cache=True), CACHE)

        def step():
            prior(input_ids=ids[:, prefix:], use_cache=True, **{CACHE: cache})
            cache.crop(-tokens)

        return timeit({"f": step}, repeats, warmup=3)["f"]


def bench_jacobi(repeats: int, pipeline: str) -> None:
    """Speculative Jacobi decoding against the sequential eager loop on a trained prior (the demo's)."""
    from stage2_prior.pipeline import VQGenPipeline
    from stage2_prior.quality import Judge, sample_pipeline
    from stage2_prior.sampling import sample_codes

    if not Path(pipeline, "pipeline.json").is_file():
        raise SystemExit(f"{pipeline} holds no pipeline: run `make demo` first (or pass --pipeline)")
    pipe = VQGenPipeline.from_pretrained(pipeline)
    prior, n_codes = pipe.prior, pipe.layout.num_codes
    own = pipe.prior.generation_config.guidance_scale or 1.0  # the prior's recommended guidance
    for batch, images in ((1, 8), (10, 20), (100, 100)):
        for guidance in (1.0, own):
            classes = torch.arange(images) % pipe.layout.num_classes
            forwards = {}

            def run(
                decoding, window=16, images=images, classes=classes, guidance=guidance, batch=batch, forwards=forwards
            ):
                stats: dict = {}
                g = torch.Generator().manual_seed(0)
                sample_codes(prior, images, classes=classes, guidance_scale=guidance, generator=g, batch_size=batch,
                             decoding=decoding, window=window, stats=stats)  # fmt: skip
                forwards[(decoding, window)] = stats["forwards"] / (images / batch)  # per batch

            windows = (4, 8, 16)
            fns = {"sequential": lambda: run("sequential")}
            fns |= {f"jacobi{w}": (lambda w=w: run("jacobi", w)) for w in windows}
            t = timeit(fns, max(3, repeats // 2), warmup=1)
            best = min(windows, key=lambda w: t[f"jacobi{w}"])
            # The ceiling: the time jacobi would save if its bookkeeping were free, i.e. the forwards it saves
            # times what a window-token forward costs against a one-token forward (mid-grid cache, same rows).
            rows = batch * (2 if guidance != 1 else 1)
            one = forward_cost(prior, rows, 1, 2 + n_codes // 2, 3 * repeats)
            ceiling = {
                w: forwards[("sequential", 16)] / forwards[("jacobi", w)] * one
                / forward_cost(prior, rows, w, 2 + n_codes // 2, 3 * repeats)
                for w in windows
            }  # fmt: skip
            row(
                f"jacobi decoding, batch {batch}"
                + (f", guidance {guidance:g} (the prior's own)" if guidance != 1 else ""),
                f"{forwards[('sequential', 16)] / forwards[('jacobi', best)]:.2f}x fewer forwards, "
                f"{t['sequential'] / t[f'jacobi{best}']:.2f}x less time (window {best})",
                ">= 2x fewer forwards, >= 1.8x less time (batch 1 and 10)",
                f"forwards per batch: sequential {forwards[('sequential', 16)]:.0f}, "
                + ", ".join(f"window {w} {forwards[('jacobi', w)]:.1f}" for w in windows)
                + f"; ms per batch: sequential {t['sequential'] * 1e3 / (images / batch):.0f}, "
                + ", ".join(f"window {w} {t[f'jacobi{w}'] * 1e3 / (images / batch):.0f}" for w in windows)
                + f" ({n_codes} codes an image); ceiling with free bookkeeping "
                + ", ".join(f"window {w} {ceiling[w]:.2f}x" for w in windows),
            )
    judge = Judge("test")
    scores = {}
    for decoding in ("sequential", "jacobi"):
        samples, asked = sample_pipeline(pipe, 100, seed=0, decoding=decoding)
        scores[decoding] = judge.score(samples, asked, draws=3)
    seq, jac = scores["sequential"], scores["jacobi"]
    row(
        "sample quality, 1000 jacobi vs 1000 sequential samples (the prior's own settings)",
        f"FD ratio {jac['frechet_distance_ratio']:.2f} vs {seq['frechet_distance_ratio']:.2f}; recognised "
        f"{jac['recognised_as_asked']:.1%} vs {seq['recognised_as_asked']:.1%}",
        "within the metric's noise",
        f"KID {jac['kid']:.4f} vs {seq['kid']:.4f}; the real reference's FD is "
        f"{seq['frechet_distance_real_reference']['mean']:.2f} +- {seq['frechet_distance_real_reference']['std']:.2f}",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="quantizer,stage1,vqgan,stage2,sampling,jacobi,extraction,demo,metrics,app")
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
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
