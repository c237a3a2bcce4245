"""Run `stage1_vqvae.extract` and report its time and memory as one JSON line (used by benchmarks/run.py).

    python -m benchmarks.extract_rss --model DIR --output_dir DIR data.source=DIR

Peak RSS (VmHWM) counts the pages of the memory-mapped Arrow source that extraction has read, so it rises
with the dataset's size even when no buffer does. A thread therefore samples RssAnon (heap: buffers, tensors)
and RssFile (mapped files) every 10 ms; "peak_anon_mib" is the figure that must not grow with the dataset.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time


def _status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: int(v) for k, v in re.findall(r"^(VmHWM|RssAnon|RssFile):\s+(\d+) kB", text, re.M)}


def main(argv: list[str]) -> None:
    from stage1_vqvae.extract import main as extract

    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    extract(argv)
    secs = time.perf_counter() - t0
    done.set()
    sampler.join()
    s = _status()
    print(
        json.dumps(
            {
                "seconds": secs,
                "peak_rss_mib": s["VmHWM"] / 1024,
                "peak_anon_mib": peak["RssAnon"] / 1024,
                "peak_file_mib": peak["RssFile"] / 1024,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
