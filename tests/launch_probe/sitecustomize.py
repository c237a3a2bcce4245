"""Imported at the start of every Python process that `helpers.run_two_processes` launches (PYTHONPATH): at exit,
after everything the command ran, a process whose default process group is still initialised says so. A group
left to the interpreter's teardown is what aborted ranks now and then (issue 36); the helper fails on the line."""

import atexit
import os
import sys

LEFT = "vqgen-test: the process group was not destroyed before exit"


@atexit.register  # registered first, so it runs last of the exit handlers
def _check_process_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        print(f"[rank {os.environ.get('RANK', '?')}] {LEFT}", file=sys.stderr, flush=True)
