"""Run a launcher and give the scheduler the exit code 75 that the launcher swallows.

    python -m vqgen.requeue accelerate launch -m stage1_vqvae.train --config ... --resume_from_checkpoint auto
    vqgen-requeue torchrun --nproc_per_node 8 -m stage2_prior.train --config ... --resume_from_checkpoint auto

A trainer (or extraction) stopped by a signal or `train.max_time` saves a complete checkpoint and exits with 75
("try again"), but `accelerate launch` and `torchrun` report any worker's non-zero exit as their own 1, so a
Kubernetes `podFailurePolicy` on 75, or a SLURM script testing for it, never sees it (audit 3, S4-5). This wrapper
runs the command with `VQGEN_STOP_MARKER` set to a file of its own; every rank that stops for a requeue writes it
(`vqgen.preemption.mark_stopped`, just before exiting 75), and the environment reaches the workers through
either launcher. Then the wrapper exits with 75 if the marker was written, else with the command's own code.

SIGTERM, SIGINT and SIGHUP sent to the wrapper go to the command (a launcher passes them on to its workers); run
it as the container's PID 1 (`exec`), where Kubernetes sends SIGTERM. SIGUSR1 is passed on too, but kills a
launcher (its default action): signal the training processes themselves with it (docs/slurm/vqgen.sbatch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from vqgen.preemption import EXIT_PREEMPTED, STOP_MARKER_ENV

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def run(command: list[str]) -> int:
    """Run `command` to its end; 75 when a process of it stopped for a requeue, else its exit code (128 + N for
    a signal N, as a shell reports it)."""
    with tempfile.TemporaryDirectory(prefix="vqgen-requeue-") as tmp:
        marker = Path(tmp) / "stopped.json"
        try:
            child = subprocess.Popen(command, env={**os.environ, STOP_MARKER_ENV: str(marker)})
        except OSError as e:
            print(f"error: vqgen.requeue: cannot run {command[0]!r} ({e.strerror})", file=sys.stderr)
            return 127
        previous = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum)) for sig in FORWARDED}
        try:
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if marker.is_file():
            stop = json.loads(marker.read_text())
            print(f"vqgen.requeue: stopped for a requeue ({stop.get('reason')}; {stop.get('where')}); the command "
                  f"exited {code}, exiting {EXIT_PREEMPTED}", file=sys.stderr, flush=True)  # fmt: skip
            return EXIT_PREEMPTED
        return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vqgen.requeue", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command line, as you would run it")
    command = parser.parse_args(argv).command
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("give the command to run, e.g. accelerate launch -m stage1_vqvae.train --config ...")
    return run(command)


def cli(argv: list[str] | None = None) -> None:
    raise SystemExit(main(argv))


if __name__ == "__main__":
    cli()
