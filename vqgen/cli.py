"""User errors and the CLI wrapper every vqgen script runs under: a VqgenError becomes one `error:` line and exit
code 2, printed once under a launcher."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from vqgen.files import write_json


class VqgenError(Exception):
    """A user error: bad config, bad data, a missing or mismatching file. Printed without a traceback.

    `every_rank=True` marks an error that every process of a launch raises alike (a bad config, a used output
    folder): only rank 0 prints it. Any other error is printed by the rank that raised it.
    """

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def run_cli(main, argv: list[str] | None = None) -> None:
    """Run a script's main(); a VqgenError becomes one `error: ...` line on stderr and exit code 2.

    Under a launcher (accelerate launch, torchrun) every process stops; an error that every rank raises alike
    is printed by rank 0 alone, any other by the rank that met it. A process launched beside others then ends
    without the interpreter's teardown (`leave_launched_process`), whatever way main() ended.
    """
    if not launched_beside_others():
        try:
            call_main(main, argv)
        finally:
            end_process_group()
        return
    try:
        call_main(main, argv)
        code = 0
    except SystemExit as e:
        code = exit_status(e.code)
    except BaseException as e:  # what the interpreter would print and exit with
        sys.excepthook(type(e), e, e.__traceback__)
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    end_process_group()
    leave_launched_process(code)


def call_main(main, argv: list[str] | None) -> None:
    try:
        main(argv)
    except VqgenError as e:
        if os.environ.get("RANK", "0") == "0" or not e.every_rank:
            print(f"error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:  # (torch.distributed.DistBackendError is one)
        if not peer_lost(e):
            raise
        said = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0])[:100]  # gloo's "[file:line] " prefix dropped
        print(f"\nerror: this process (rank {os.environ.get('RANK', '?')}) lost contact with another process of the "
              f"job during a collective ({said}): a node or process died. The last complete checkpoint is intact: "
              "requeue the same command with --resume_from_checkpoint auto", file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from None


def launched_beside_others() -> bool:
    """One of several processes of a launch (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def exit_status(code) -> int:
    """The exit status SystemExit(code) gives: None is 0; a message is printed and is 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def leave_launched_process(code: int):
    """Exit with `code` after what the interpreter does first on its way out (non-daemon threads joined, atexit
    handlers run, streams flushed), but without its teardown.

    Destroying the process group does not stop gloo's worker threads: the group outlives it (DDP's reducer and
    FSDP's parameter groups still hold it), and a worker frees each finished collective after the rank has
    seen it finish. Freeing one that holds tensors with Python objects (FSDP's all-gather outputs, kept by the
    barrier after them) takes the GIL. When the main thread has meanwhile reached the teardown, that thread
    exits inside a destructor: `std::terminate`, "terminate called without an active exception", SIGABRT, and
    the launcher reports a finished job failed (a core dump of the FSDP test's rank 1 shows exactly this;
    about 1 run in 40 on a loaded 2-core machine). Without the teardown nothing is left to race."""
    import atexit
    import gc
    import threading

    gc.collect()  # unreachable objects finalized while the interpreter is whole
    shutdown = getattr(threading, "_shutdown", None)  # the interpreter's own first step: joins non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)


# What gloo and NCCL say when the other end of a collective is gone (a killed process, a failed node).
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "Watchdog caught collective operation timeout", "Socket Timeout")  # fmt: skip


def peer_lost(e: BaseException) -> bool:
    dist = sys.modules.get("torch.distributed")
    launched = dist is not None and dist.is_available() and dist.is_initialized()
    return launched and (type(e).__name__ == "DistBackendError" or any(m in str(e) for m in PEER_LOST))


def refuse_existing(out: Path, overwrite: bool) -> None:
    """The one refusal of an output folder that already exists (every rank raises it alike under a launcher)."""
    if Path(out).exists() and not overwrite:
        raise VqgenError(
            f"{out} already exists; pass --overwrite_output_dir or choose another --output_dir", every_rank=True
        )


def launch_state():
    """accelerate's PartialState of this launch, for the commands that need no Accelerator (export, sample.py, ...).

    `PartialState()` alone ignores `ACCELERATE_USE_CPU` (only `Accelerator` and `AcceleratorState` read it), so on
    CPUs under torchrun every rank came up as a lone main process, and the commands that let the main process alone
    write had every rank write. Passing the flag on makes it the gloo launch that Accelerator would see."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def end_process_group() -> None:
    """Destroy the default process group, if this process started one (every command ends here, whatever way).

    NCCL warns when `destroy_process_group()` was not called. (It was meant to end gloo's rare abort at exit
    too, issue 36; that took `leave_launched_process`.) The trainers' `end_training` already did it; the other
    commands never end their Accelerator. On an error the other ranks may still wait in a collective: this
    rank's group holds no work in flight then, and the launcher stops the others once this one exits."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for a command that did not
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def user_message(e: VqgenError) -> str:
    """The error's own line. A DataLoader worker's error arrives re-raised in the main process with the worker's
    traceback folded into the message ("Caught VqgenError in DataLoader worker process 0. Original
    Traceback ..."); its last line is what the worker raised."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split("VqgenError: ", 1)[-1]
    return text


def report_metrics(result: dict, output_dir: str | None) -> None:
    """An evaluation CLI's output: metrics.json in output_dir, and the JSON printed. Call it on the main process
    only."""
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(output_dir) / "metrics.json", result)
    print(json.dumps(result, indent=2))
