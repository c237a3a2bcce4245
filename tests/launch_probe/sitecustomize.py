"""Imported at the start of every Python process that `helpers.run_two_processes` launches (PYTHONPATH), and by
tests/fsdp_probe: it says when a rank ends in a way that can abort it after its work is done, and the tests fail on
the line. Two ways:

- its default process group is still initialised at exit (issue 36: the commands destroy it);
- it reaches the interpreter's teardown at all. gloo's worker threads outlive a destroyed group and may still free a
  finished collective, which takes the GIL; in the teardown that thread dies inside a destructor and the rank
  aborts (SIGABRT), rarely and only under load (vqgen.cli.leave_launched_process). A launched command must end
  before the teardown, so this checks the cause on every run rather than waiting for the rare abort.
"""

import atexit
import os
import sys

LEFT = "vqgen-test: the process group was not destroyed before exit"
TORN_DOWN = "vqgen-test: a launched process reached the interpreter's teardown"


@atexit.register  # registered first, so it runs last of the exit handlers
def _check_process_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        print(f"[rank {os.environ.get('RANK', '?')}] {LEFT}", file=sys.stderr, flush=True)


class _Teardown:
    """Deleted only when the teardown clears the modules' globals (os._exit skips it)."""

    def __init__(self):
        self.line = f"[rank {os.environ.get('RANK', '?')}] {TORN_DOWN}\n".encode()
        self.write = os.write  # the os module may be gone by then

    def __del__(self):
        self.write(2, self.line)


if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # the launched ranks, not the launcher
    _sentinel = _Teardown()
