"""How fast a run goes: throughput (with the warm-up kept apart), the accelerator's peak memory, and the projected
wall time of the whole run, said once, with a warning when a run without a GPU would take hours."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from vqgen.config import builtin_configs

if TYPE_CHECKING:
    from vqgen.training import BaseTrainConfig


def steady_rate(t_end: float, t_warm: float | None, items: int) -> float | None:
    """Items per second after the warm-up (the first log interval); None when the run logged only at its end."""
    if t_warm is None or t_end <= t_warm or items <= 0:
        return None
    return items / (t_end - t_warm)


def peak_accelerator_memory_gib(device: torch.device) -> float | None:
    """The peak of the CUDA caching allocator on this process's device, in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


CPU_WARN_S = 2 * 3600  # a projected CPU run longer than this is said to be one (RunStats.project)


def hours(seconds: float) -> str:
    """1 h 05 min, 12 min, 40 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{int(seconds // 60)} min" if seconds >= 60 else f"{seconds:.0f} s"


class RunStats:
    """Throughput of a run in `unit`s (images, tokens): the rate so far, the steady rate after the first log
    interval (which holds the warm-up: autotuning, worker start-up, allocator growth), and the summary figures."""

    def __init__(self, unit: str, start_step: int = 0):
        import time

        self.unit, self.clock = unit, time.perf_counter
        self.t0, self.seen = self.clock(), 0
        self.t_warm, self.seen_warm = None, 0
        self.start_step, self.projected = start_step, False

    def add(self, n: int) -> None:
        self.seen += n

    def rate(self) -> float:
        """Units per second since the start, marking the end of the warm-up at the first call."""
        if self.t_warm is None:
            self.t_warm, self.seen_warm = self.clock(), self.seen
        return self.seen / (self.clock() - self.t0)

    def project(self, step: int, tc: BaseTrainConfig, device, threshold_s: float | None = None) -> float | None:
        """Once, at the first log: the projected wall time of the whole run at this step rate, logged; on a machine
        without an accelerator a projection past `threshold_s` is a warning that names a CPU-sized recipe."""
        if self.projected or step <= self.start_step:
            return None
        self.projected = True
        per_step = (self.clock() - self.t0) / (step - self.start_step)
        total = per_step * (tc.max_steps - self.start_step)
        log = logging.getLogger(__name__)
        log.info("projected wall time for train.max_steps=%d on %s: %s (%.2f s a step)",
                 tc.max_steps, device.type, hours(total), per_step)  # fmt: skip
        if device.type == "cpu" and total > (CPU_WARN_S if threshold_s is None else threshold_s):
            cpu = [c for c in builtin_configs() if c.startswith("own-cpu/")]
            recipe = f"the CPU recipe configs/{cpu[0].split('/')[0]}/ is sized for one" if cpu else "size it down"
            log.warning(
                "this run would take about %s on this machine, which has no GPU: lower train.max_steps or the "
                "model, or %s (docs/benchmarks.md has its times)", hours(total), recipe,
            )  # fmt: skip
        return total

    def summary(self, device) -> dict:
        wall = self.clock() - self.t0
        return {
            "wall_time_s": wall,
            f"{self.unit}_per_s": self.seen / wall if wall > 0 else None,
            f"{self.unit}_per_s_after_first_log": steady_rate(self.t0 + wall, self.t_warm, self.seen - self.seen_warm),
            "peak_accelerator_memory_gib": peak_accelerator_memory_gib(device),
        }
