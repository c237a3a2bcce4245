"""The app under many visitors at once (a `make bench` row, `app-load`): the page served as users serve it
(`python -m stage2_prior.app`, its own process, its queue of 16 unless `--queue_size`), N concurrent
gradio_client visitors each asking for `--requests` 10-image grids one after another.

    python -m benchmarks.app_load [--pipeline runs/demo/pipeline] [--clients 1,4,16,32] [--requests 3]

Per N: requests served, refused as busy (Gradio's "queue is full"), other errors (must be 0), p50/p95 latency of
the served ones, images per second over the burst, and the server's peak RSS (sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import ROOT


def start_server(pipeline: str, port: int, queue_size: int):
    cmd = [sys.executable, "-m", "stage2_prior.app", "--pipeline", pipeline, "--port", str(port), "--device", "cpu",
           "--queue_size", str(queue_size)]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from gradio_client import Client

    for _ in range(600):
        try:
            return server, Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:  # not up yet
            time.sleep(0.2)
    raise RuntimeError("the app did not start")


def burst(url: str, clients: int, requests: int) -> dict:
    from gradio_client import Client
    from gradio_client.utils import QueueError

    latencies, outcome, lock = [], {"served": 0, "busy": 0, "errors": 0}, threading.Lock()

    def visitor(i: int) -> None:
        client = Client(url, verbose=False)
        for r in range(requests):
            t0 = time.perf_counter()
            try:
                images, _ = client.predict("0", 10, 1.0, 1.0, 0, 1.0, i * 100 + r, "sequential", api_name="/generate")
                key = "served" if len(images) == 10 else "errors"
            except QueueError:
                key = "busy"
            except Exception:  # anything else is a failure of the page
                key = "errors"
            with lock:
                outcome[key] += 1
                if key == "served":
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {**outcome, "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "images_per_s": 10 * outcome["served"] / wall}  # fmt: skip


def bench(pipeline: str, counts: list[int], requests: int, row, queue_size: int = 16) -> None:
    from benchmarks.app import free_port

    port = free_port()
    server, _ = start_server(pipeline, port, queue_size)
    peak, stop = [0], threading.Event()

    def sample_rss() -> None:
        proc = psutil.Process(server.pid)
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    watcher = threading.Thread(target=sample_rss, daemon=True)
    watcher.start()
    try:
        for n in counts:
            peak[0] = psutil.Process(server.pid).memory_info().rss
            r = burst(f"http://127.0.0.1:{port}/", n, requests)
            row(f"app-load: {n} visitors x {requests} 10-image grids", f"{r['served']} served, {r['busy']} busy, "
                f"{r['errors']} errors", f"0 errors; busy past the queue ({queue_size})",
                f"p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s, {r['images_per_s']:.1f} images/s, server peak RSS "
                f"{peak[0] / 2**20:.0f} MiB")  # fmt: skip
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(Path(ROOT) / "runs" / "demo" / "pipeline"))
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--queue_size", type=int, default=16, help="the app's (a large one: the unbounded queue)")
    args = parser.parse_args(argv)
    if not (Path(args.pipeline) / "pipeline.json").is_file():
        raise SystemExit(f"no pipeline at {args.pipeline}: run `make demo` first (or pass --pipeline)")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    print("| what | figure | target | detail |\n|---|---|---|---|")
    bench(args.pipeline, [int(c) for c in args.clients.split(",")], args.requests,
          lambda *cells: print("| " + " | ".join(cells) + " |", flush=True), args.queue_size)  # fmt: skip


if __name__ == "__main__":
    main()
