"""What every benchmark script shares: interleaved median timing, the reference matmul rate measured beside it,
FLOP counts, the markdown rows they print, and a random Inception for machines without its weights file."""

from __future__ import annotations

import statistics
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


def random_inception(seed: int = 0):
    """torch-fidelity's Inception-V3 module with random weights (benchmarks and tests run without the real file):
    its constructor would download the weights, so that one call and the state-dict load are skipped for it.
    Save `.state_dict()` for a weights file in torch-fidelity's own format."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with torch.random.fork_rng(), mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None):
        torch.manual_seed(seed)
        with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
            net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    net.fc.weight.data.mul_(0.05)  # logits of a few units, as a trained classifier's (softmax stays finite)
    return net
