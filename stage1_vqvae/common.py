"""Shared plumbing for both stages: typed configs, the LR schedule, atomic step-named checkpoints.

Stage 2 imports this module (and the hub helpers), never stage 1's training code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any

import torch
import yaml


class VqgenError(Exception):
    """A user error: bad config, bad data, a missing or mismatching file. Printed without a traceback."""


# --------------------------------------------------------------------------------------------------
# Typed configs: dataclasses are the schema, YAML holds values, dotted CLI overrides win.


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce: int -> float) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except VqgenError as e:
                errors.append(str(e))
        raise VqgenError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise VqgenError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise VqgenError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise VqgenError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise VqgenError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise VqgenError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise VqgenError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise VqgenError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise VqgenError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise VqgenError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise VqgenError(
            f"{where}: unknown key(s) {unknown}. Valid keys: {names}. Fix the spelling in the YAML "
            "file or the command line."
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise VqgenError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str]) -> dict:
    """`a.b=1 --c.d=x --e f` -> nested dict; values parsed as YAML scalars (so 1e-3, true, null work)."""
    out: dict = {}
    i = 0
    while i < len(items):
        item = items[i]
        key = item[2:] if item.startswith("--") else item
        if "=" in key:
            key, raw = key.split("=", 1)
        elif item.startswith("--") and i + 1 < len(items):
            i += 1
            raw = items[i]
        else:
            raise VqgenError(f"cannot parse override {item!r}: write it as section.key=value")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise VqgenError(f"override {item!r} conflicts with another override of {p!r}")
        node[leaf] = value
        i += 1
    return out


def deep_update(base: dict, new: dict) -> dict:
    merged = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_update(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_config(cls: type, path: str | os.PathLike | None, overrides: list[str]) -> Any:
    """YAML file (optional) + dotted overrides -> validated dataclass `cls`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise VqgenError(f"config file {p} does not exist (or is not a file). Pass --config configs/...yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise VqgenError(f"config file {p} is not valid YAML: {e}") from None
    data = deep_update(data, parse_overrides(overrides))
    return from_dict(cls, data)


# --------------------------------------------------------------------------------------------------
# The learning rate as a pure function of the optimizer step (resume needs no scheduler state).


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to base_lr, then cosine decay to base_lr * min_lr_ratio at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------
# Files: atomic folders, step-named checkpoints with retention, safe names.

CKPT_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def safe_name(name: str) -> str:
    """A string that can be one path component: no separators, no '..', nothing hidden."""
    cleaned = re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(name)).strip("._") or "unnamed"
    return cleaned[:120]


def atomic_dir(final: Path) -> Path:
    """A fresh sibling temp folder; `commit_dir(tmp, final)` renames it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` with renames only, so a reader never sees a half-written folder."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their state file exists), oldest first."""
    if not Path(ckpt_root).is_dir():
        return []
    found = []
    for p in Path(ckpt_root).iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """`latest` -> newest complete checkpoint (None if there is none); a path -> that checkpoint."""
    if resume in (None, "", "none"):
        return None
    if resume == "latest":
        ckpts = list_checkpoints(ckpt_root)
        return ckpts[-1][1] if ckpts else None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise VqgenError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}). Use --resume latest")
    return p


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, p in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to silently reuse a folder that already holds a run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VqgenError(f"output_dir {out} is a file, not a folder. Choose another train.output_dir")
    holds_run = out.is_dir() and any((out / n).exists() for n in ("checkpoints", "model", "config.yaml"))
    if holds_run and not resume:
        if not overwrite:
            raise VqgenError(
                f"output_dir {out} already holds a run. Pass --resume latest to continue it, --overwrite to "
                "replace it, or choose another train.output_dir"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise VqgenError(f"cannot write to output_dir {out} ({e.strerror}). Choose a writable folder") from None


def dump_yaml(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def save_checkpoint(accelerator, ckpt_root: Path, step: int, keep: int) -> Path:
    """save_state into a temp folder, then rename to step_XXXXXXXX: `latest` never sees a partial save."""
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, {"step": step})
        commit_dir(tmp, final)
        prune_checkpoints(ckpt_root, keep)
    accelerator.wait_for_everyone()
    return final


class LossWatch:
    """Remembers the first optimizer step whose loss was not finite, on the loss's device.

    `observe` every step costs no host sync (a `.item()` per step stalls a GPU's queue); `check` syncs once and
    runs only where it matters: at log steps and before anything is evaluated or saved, so no checkpoint or
    model is written after a non-finite loss.
    """

    def __init__(self, advice: str):
        self.advice = advice
        self.first_step: torch.Tensor | None = None  # () int64, -1 while every loss was finite
        self.value: torch.Tensor | None = None  # the first non-finite loss

    def observe(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.value = torch.zeros((), device=loss.device)
        new = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.value = torch.where(new, loss, self.value)

    def after_step(self, loss: torch.Tensor, step: int, tc, last_checkpoint: Path | None) -> tuple[bool, bool, bool]:
        """Observe optimizer step `step`, return (log, evaluate, save) due by the TrainConfig `tc` (the last step
        does all three), and check when any of them is due."""
        self.observe(loss, step)
        last = step >= tc.max_steps
        log = step % tc.log_every == 0 or last
        evaluate = bool(tc.eval_every) and (step % tc.eval_every == 0 or last)
        save = bool(tc.checkpoint_every) and (step % tc.checkpoint_every == 0 or last)
        if log or evaluate or save:
            self.check(last_checkpoint)
        return log, evaluate, save

    def check(self, last_checkpoint: Path | None) -> None:
        if self.first_step is None or int(self.first_step) < 0:
            return
        raise VqgenError(
            f"the loss became {float(self.value)} at step {int(self.first_step)}; nothing was saved after it. "
            f"Last good checkpoint: {last_checkpoint or 'none'}. {self.advice}, then --resume latest"
        )


def run_cli(main, argv: list[str] | None = None) -> None:
    """Run a script's main(); a VqgenError becomes one `error: ...` line on stderr and exit code 2."""
    try:
        main(argv)
    except VqgenError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def build_accelerator(tc, out: Path, kwargs_handlers=()):
    """The Accelerator both trainers use, plus the per-process batch; `tc` is a stage's TrainConfig."""
    import logging

    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin

    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        log_with=None if tc.report_to == "none" else tc.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Epoch e's order is a function of (seed, e): skipping batches on resume replays the same data.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=list(kwargs_handlers),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if tc.compile else None,
    )
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    per_device, rem = divmod(tc.batch_size, accelerator.num_processes * tc.gradient_accumulation_steps)
    if rem or per_device == 0:
        raise VqgenError(
            f"train.batch_size {tc.batch_size} is not divisible by processes x accumulation "
            f"({accelerator.num_processes} x {tc.gradient_accumulation_steps})"
        )
    return accelerator, per_device


def init_trackers(accelerator, project: str, cfg) -> None:
    """Log the flattened config as hyperparameters (main process, when a tracker is on)."""
    if accelerator.is_main_process and cfg.train.report_to != "none":
        flat = {
            f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for s, d in to_dict(cfg).items()
            for k, v in d.items()
        }
        accelerator.init_trackers(project, config=flat)
