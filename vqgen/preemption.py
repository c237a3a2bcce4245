"""Stopping cleanly on shared machines: a signal (SLURM's, Kubernetes', a spot instance's) or a wall-clock budget
ends a run with a complete checkpoint at a step every rank agreed on, and a documented exit code.

- `Stopper.install()` catches `train.stop_signals` (SIGTERM and SIGUSR1 by default). The handler only notes the
  signal: the step in progress finishes, and a second signal during the save changes nothing (the save's
  completeness marker, written last, already keeps a half-written checkpoint from ever being resumed).
- `Stopper.should_stop(accelerator)` is called once per optimizer step on every rank: a rank that saw a signal
  or whose next step would pass `train.max_time` sets Accelerate's trigger, and `check_trigger` (one all-reduce
  of one flag) makes every rank stop at that same step, whichever rank was signalled.
- The trainer then saves, logs where, and exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), which a
  SLURM script or a Kubernetes restart policy requeues on; the same command line with
  `--resume_from_checkpoint auto` continues it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing.util  # noqa: F401 (its exit handler must be registered before ours, which then runs first)
import os
import re
import signal
import time
from pathlib import Path

from vqgen.cli import VqgenError

logger = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retry the same command
STOP_MARKER_ENV = "VQGEN_STOP_MARKER"  # set by vqgen.requeue: the file a stopping rank writes


def mark_stopped(reason: str, where: str) -> None:
    """Before exiting with EXIT_PREEMPTED: write the marker file that `vqgen.requeue` set up, if any. Launchers turn
    a worker's 75 into their own 1; the marker is what reaches the scheduler through them. Every rank may write
    it (the same content, an atomic rename)."""
    path = os.environ.get(STOP_MARKER_ENV)
    if path:
        from vqgen.files import write_json

        write_json(Path(path), {"reason": reason, "where": where, "exit_code": EXIT_PREEMPTED})


def parse_duration(value) -> float | None:
    """`train.max_time`: seconds (a number), "HH:MM:SS", "MM:SS", or "D-HH:MM:SS" (SLURM's --time format)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", str(value).strip())
        if m is None:
            try:
                seconds = float(value)
            except ValueError:
                raise VqgenError(
                    f"train.max_time={value!r} is not a duration: use seconds or HH:MM:SS (e.g. 23:30:00)"
                ) from None
        else:
            days, hours, minutes, secs = (int(g) if g else 0 for g in m.groups())
            seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds <= 0:
        raise VqgenError(f"train.max_time must be positive, got {value!r}")
    return seconds


def signal_numbers(names: list[str]) -> list[int]:
    out = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if not hasattr(signal, key):
            raise VqgenError(f"train.stop_signals: {name!r} is not a signal of this system (e.g. SIGTERM, SIGUSR1)")
        out.append(int(getattr(signal, key)))
    return out


DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def ignore_stop_signals(worker_id: int, names: tuple[str, ...] = DEFAULT_STOP_SIGNALS) -> None:
    """DataLoader `worker_init_fn`: workers ignore the stop signals (a signal sent to the whole process group
    must not kill one mid-batch); the main process finishes the step and shuts them down."""
    for sig in signal_numbers(list(names)):
        signal.signal(sig, signal.SIG_IGN)


def worker_init_for(stop_signals) -> functools.partial:
    """The `worker_init_fn` of a loader whose process stops on `stop_signals` (train.stop_signals): picklable, so
    spawned workers get it too."""
    return functools.partial(ignore_stop_signals, names=tuple(stop_signals))


def _ignores_sigterm(pid: int) -> bool:
    """Whether process `pid` ignores SIGTERM (Linux: its SigIgn mask); True where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    except (OSError, StopIteration, ValueError):
        return True
    return bool(mask & (1 << (signal.SIGTERM - 1)))


@atexit.register  # registered after multiprocessing's exit handler (imported above), so it runs before it
def _kill_workers_that_ignore_sigterm() -> None:
    """At exit, a DataLoader worker still alive (its iterator kept by an error's traceback) ignores SIGTERM, and
    multiprocessing's exit handler, which SIGTERMs daemonic children and then joins them, would wait for it
    forever: a CLI that failed would never return. Such workers hold no state, so they get SIGKILL first."""
    import multiprocessing

    stuck = [c for c in multiprocessing.active_children() if c.daemon and c.pid and _ignores_sigterm(c.pid)]
    if stuck and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for a worker killed on purpose
    for child in stuck:
        child.kill()
        child.join(timeout=5)


class Stopper:
    """Signals and the time budget of one run (see the module's docstring)."""

    def __init__(self, stop_signals: list[str], max_time=None):
        self.signals = signal_numbers(stop_signals)
        self.budget = parse_duration(max_time)
        self.received: int | None = None  # the first signal caught
        self.reason: str | None = None
        self.t0 = time.monotonic()
        self.last_step_end: float | None = None
        self.longest_step = 0.0
        self.elapsed = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> Stopper:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> Stopper:  # caught while the training loop runs, and only then
        return self.install()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is SystemExit and exc.code == EXIT_PREEMPTED:
            # On the way out with a complete checkpoint: a second signal must not turn exit 75 into a kill.
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)
            self._previous = {}
        else:
            self.uninstall()
            if exc_type is None and self.received is not None:  # a signal after the last step ended nothing
                logger.warning(
                    "%s arrived after the last step: the run finished and its output is saved (exit 0)",
                    signal.Signals(self.received).name,
                )

    def _note(self, signum, frame) -> None:  # a handler must not raise: the step (or the save) runs on
        if self.received is None:
            self.received = signum

    def _local_reason(self) -> str | None:
        now = time.monotonic()
        if self.last_step_end is not None:
            self.longest_step = max(self.longest_step, now - self.last_step_end)
        self.last_step_end = now
        self.elapsed = now - self.t0
        if self.received is not None:
            return signal.Signals(self.received).name
        if self.budget is not None and now - self.t0 + self.longest_step > self.budget:
            return f"train.max_time ({self.budget:.0f} s): the next step would pass it"
        return None

    def note(self) -> dict:
        """What the stop's checkpoint records about it."""
        return {
            "stopped_by": self.reason,
            "elapsed_s": round(self.elapsed, 6),
            "longest_step_s": round(self.longest_step, 6),
        }

    def signalled(self, accelerator) -> bool:
        """Every rank, after the loop: whether any rank has caught a stop signal (one all-reduced flag), so that
        every rank skips the same optional work on the way to the final model."""
        if self.received is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def should_stop(self, accelerator) -> bool:
        """Every rank, once per optimizer step: True on all ranks at the same step once any rank must stop."""
        local = self._local_reason()
        if local is not None:
            self.reason = self.reason or local
            accelerator.set_trigger()
        if accelerator.check_trigger():
            self.reason = self.reason or "another rank was signalled"
            return True
        return False
