"""A run's checkpoints: accelerate's `save_state` into `checkpoints/checkpoint_<step>`, the state file that marks one
complete (written last, once every rank has written its files), pruning that only ever removes what a newer complete
checkpoint replaces, and the resume rules of `--resume_from_checkpoint`."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from vqgen.cli import VqgenError
from vqgen.files import write_json
from vqgen.streaming import load_stream_state, save_stream_state

CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their state file exists), oldest first.

    Not accelerate's `load_state()` without a path: it takes the newest `checkpoint_*` folder by name, also one
    that a kill left half-written, which the resume after a kill -9 must never pick (tested)."""
    if not Path(ckpt_root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_root).iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted((s, p) for s, p in found if (p / STATE_FILE).is_file())


def resolve_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """`latest` -> newest complete checkpoint; `auto` -> the same, or None when there is none (a fresh start);
    a path -> that checkpoint; None -> None."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        ckpts = list_checkpoints(ckpt_root)
        return ckpts[-1][1] if ckpts else None
    if resume == "latest":
        ckpts = list_checkpoints(ckpt_root)
        if not ckpts:
            raise VqgenError(
                f"--resume_from_checkpoint latest: {ckpt_root} holds no complete checkpoint. To start a new run "
                "there, pass --overwrite_output_dir instead (or --resume_from_checkpoint auto, which resumes when "
                "there is a checkpoint and starts afresh when there is none)",
                every_rank=True,
            )
        return ckpts[-1][1]
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise VqgenError(f"--resume_from_checkpoint {resume}: not a complete checkpoint (no {STATE_FILE}); try latest")
    return p


def save_checkpoint(accelerator, step: int, note: dict | None = None, keep: int | None = None, stream=None) -> Path:
    """accelerate's save_state into checkpoints/checkpoint_<step>, then the state file that marks it complete
    (`note`: why the run stopped there, when a signal or the time budget stopped it), then the pruning.

    The order is what makes a kill at any moment safe: the marker is written once every rank has written its
    files (a rank's RNG state, a stream's position), and old checkpoints are pruned only after it, to the `keep`
    newest complete ones (`train.checkpoints_total_limit`; 0 or None keeps all), so there is always a complete
    checkpoint once the first save has finished. `stream`: the streamed train loader, whose position every rank
    saves for itself (accelerate saves registered objects from the main process only)."""
    root = Path(accelerator.project_dir) / "checkpoints"
    final = root / f"checkpoint_{step}"
    if accelerator.is_main_process and final.exists():
        discard(final)  # an incomplete save of this step from a killed run, or a checkpoint of an abandoned branch
    accelerator.wait_for_everyone()
    accelerator.save_state(str(final))
    if stream is not None:
        save_stream_state(stream, final, accelerator.process_index, accelerator.num_processes)
    accelerator.wait_for_everyone()  # every rank's files are written before the marker says "complete"
    if accelerator.is_main_process:
        write_json(final / STATE_FILE, {"step": step, **(note or {})})
        prune_checkpoints(root, keep, final)
    accelerator.wait_for_everyone()
    return final


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no moment of the deletion looks complete: renamed away first (atomic),
    then removed. A kill in between leaves a hidden `.discard-*` folder that `list_checkpoints` never reads and
    the next pruning removes."""
    trash = folder.parent / f".discard-{folder.name}-{os.getpid()}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: Path, keep: int | None, newest: Path) -> None:
    """After `newest` is complete: remove the folders a killed save left incomplete, leftovers of a killed
    deletion, and all but the `keep` newest complete checkpoints (by step; `newest` is always kept)."""
    for p in root.iterdir():
        if p.name.startswith(".discard-"):
            shutil.rmtree(p, ignore_errors=True)
        elif CKPT_RE.match(p.name) and p != newest and not (p / STATE_FILE).is_file():
            discard(p)
    if keep:
        complete = [p for _, p in list_checkpoints(root) if p != newest]
        for p in complete[: max(0, len(complete) - (keep - 1))]:
            discard(p)


def load_checkpoint(accelerator, checkpoint: Path, stream=None) -> int:
    """Restore a checkpoint of `save_checkpoint` (and, for a streamed run, this rank's stream position); returns
    its step."""
    accelerator.load_state(str(checkpoint))
    if stream is not None:
        load_stream_state(stream, Path(checkpoint), accelerator.process_index, accelerator.num_processes)
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())["step"]
