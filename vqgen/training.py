"""The training plumbing both trainers share: the config they extend, the LR schedule, the trainer CLI, the
Accelerator, loaders, trackers, output-folder checks, the stop and the non-finite-loss guard (checkpoints are in
`vqgen.checkpoints`)."""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vqgen.checkpoints import (  # noqa: F401 (re-exported: the trainers and tests import them from here)
    STATE_FILE,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from vqgen.cli import VqgenError
from vqgen.config import builtin_configs, config_help, load_config, option, to_dict
from vqgen.files import dump_yaml, write_json
from vqgen.preemption import EXIT_PREEMPTED, Stopper, mark_stopped, parse_duration, signal_numbers, worker_init_for
from vqgen.sharding import check_fsdp_backend, check_fsdp_wrap
from vqgen.streaming import StreamBatches, stream_loader


@dataclass
class BaseTrainConfig:
    output_dir: str = "runs/run"
    seed: int = 0
    batch_size: int = option(64, "global batch of one optimizer step, over all processes and accumulation steps")
    gradient_accumulation_steps: int = 1
    max_steps: int = option(1000, "optimizer steps")
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = option(0.1, "cosine floor as a fraction of learning_rate; 1.0 = constant")
    max_grad_norm: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] | None = option(None, "null: what `accelerate launch` says")
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    log_every: int = 50
    eval_every: int = option(500, "0 disables periodic validation")
    eval_max_batches: int | None = option(20, "null: the whole validation split")
    checkpoint_every: int = option(500, "0 disables checkpoints")
    checkpoints_total_limit: int = 2
    num_workers: int | None = option(
        None, "DataLoader workers; null: 0 for data in memory, up to 4 decoding on the fly"
    )
    compile: bool = option(False, "torch.compile through Accelerate's dynamo plugin")
    stop_signals: list[str] = option(
        ["SIGTERM", "SIGUSR1"], "signals that finish the step, save a checkpoint and exit 75 (docs/cluster.md)"
    )
    max_time: str | float | None = option(
        None, "wall-clock budget (seconds or HH:MM:SS): save and exit 75 before the step that would pass it"
    )
    push_to_hub: bool = option(False, "upload model/ when training ends (token from `hf auth login`)")
    hub_model_id: str | None = option(None, "the Hub repo for push_to_hub (owner/name)")

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ValueError(f"eval_max_batches must be positive or null (all), got {self.eval_max_batches}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (owner/name)")
        parse_duration(self.max_time)  # a bad budget or signal name fails at the start, not at the stop
        signal_numbers(self.stop_signals)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to base_lr, then cosine decay to base_lr * min_lr_ratio at total_steps (a pure function of
    the step, so a resumed run needs no scheduler state)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_arg_parser(doc: str, cfg_cls: type):
    """The argparse parser both trainers share: --config, HF-named flags, and every config key in --help."""
    import argparse

    parser = argparse.ArgumentParser(
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (override with section.key=value; defaults shown, a --config file sets its own):\n"
        + config_help(cfg_cls),
    )
    parser.add_argument("--config", default=None, help=f"a YAML file, or a built-in config: {builtin_configs()}")
    parser.add_argument("--output_dir", default=None, help="same as train.output_dir=...")
    parser.add_argument("--resume_from_checkpoint", default=None, metavar="auto|latest|PATH",
                        help="continue a run: auto (the newest complete checkpoint, or a fresh start when there is "
                        "none), latest (an error when there is none), or a checkpoint folder")  # fmt: skip
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace a run already in output_dir")
    parser.add_argument("--push_to_hub", action="store_true", help="same as train.push_to_hub=true")
    parser.add_argument("--hub_model_id", default=None, help="same as train.hub_model_id=...")
    return parser


def parse_train_args(doc: str, cfg_cls: type, argv: list[str] | None):
    """(args, config) of a training CLI. A config file is required: the dataclass defaults are the paper's
    full-size setup, which nobody should start by accident."""
    parser = train_arg_parser(doc, cfg_cls)
    args, overrides = parser.parse_known_args(argv)
    if args.config is None:
        raise VqgenError(f"pass --config: a YAML file or one of {builtin_configs()} (see --help)", every_rank=True)
    flags = [f"train.output_dir={args.output_dir}"] if args.output_dir else []
    if args.push_to_hub:
        flags.append("train.push_to_hub=true")
    if args.hub_model_id:
        flags.append(f"train.hub_model_id={args.hub_model_id}")
    try:
        return args, load_config(cfg_cls, args.config, [*overrides, *flags])
    except VqgenError as e:
        e.every_rank = True  # every process parses the same command line
        raise


def build_accelerator(tc: BaseTrainConfig, out: Path, kwargs_handlers=()):
    """The Accelerator both trainers use, plus the per-process batch.

    Checkpoints are named and pruned by `save_checkpoint`, not by accelerate: its automatic naming prunes before
    the new checkpoint is written and counts half-written folders, so a kill during a save could leave no complete
    checkpoint at all (audit 3, S4-2).
    """
    import logging

    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin

    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,  # None: accelerate's launcher or environment decides
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        log_with=None if tc.report_to == "none" else tc.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Epoch e's order is a function of (seed, e): skipping batches on resume replays the same data.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=list(kwargs_handlers),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if tc.compile else None,
    )
    check_fsdp_backend(accelerator)
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


def make_loaders(train, validation, per_device: int, tc: BaseTrainConfig, num_workers: int | None = None):
    """The train loader (shuffled, seeded) and the validation loader of both trainers.

    Each loader has its own generator: a DataLoader without one draws a base seed from the global RNG every
    time an iterator starts, and a resumed run starts one mid-epoch where the uninterrupted run did not, which
    shifted every later global-RNG draw (dead-code restarts, dropout) and broke bit-exact resume.
    """
    workers = num_workers if num_workers is not None else (tc.num_workers or 0)
    init = worker_init_for(tc.stop_signals) if workers else None  # workers ignore the signals the run stops on
    train_dl = None  # a stream (None here) gets its own loader
    if train is not None:
        train_dl = torch.utils.data.DataLoader(
            train,
            batch_size=per_device,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            generator=torch.Generator().manual_seed(tc.seed),
            worker_init_fn=init,  # the main process stops them
        )
    val_dl = torch.utils.data.DataLoader(
        validation,
        batch_size=per_device,  # the training batch: a larger one would set the peak memory of big images
        num_workers=workers,
        generator=torch.Generator().manual_seed(tc.seed),
        worker_init_fn=init,
    )
    return train_dl, val_dl


def init_trackers(accelerator, project: str, cfg) -> None:
    """Log the flattened config as hyperparameters (main process, when a tracker is on)."""
    if accelerator.is_main_process and cfg.train.report_to != "none":
        flat = {
            f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for s, d in to_dict(cfg).items()
            for k, v in d.items()
        }
        accelerator.init_trackers(project, config=flat)


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to silently reuse a folder that already holds a run. Read-only, so every rank calls it and every
    rank stops with the same error (a check on the main process alone would leave the others at a barrier).
    Callers wait for every rank after it, before the main process writes into the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VqgenError(f"output_dir {out} is a file, not a folder. Choose another --output_dir", every_rank=True)
    holds_run = out.is_dir() and any((out / n).exists() for n in ("checkpoints", "model", "config.yaml"))
    if holds_run and not resume and not overwrite:
        raise VqgenError(
            f"output_dir {out} already holds a run. Pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to replace it, or choose another --output_dir",
            every_rank=True,
        )


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """After `check_output_dir`, on the main process: empty it when overwriting, create it, probe that it is
    writable."""
    out = Path(out)
    holds_run = out.is_dir() and any((out / n).exists() for n in ("checkpoints", "model", "config.yaml"))
    if holds_run and overwrite and not resume:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise VqgenError(f"cannot write to output_dir {out} ({e.strerror}). Choose a writable folder") from None


class NonFiniteGuard:
    """Raises once the loss has stopped being finite, naming the first bad step, without a host sync per step.

    `observe` every step keeps the first non-finite step on the loss's device (a `.item()` per step stalls a
    GPU's queue); `check` syncs once, and the trainers call it before they log, evaluate or save, so no
    checkpoint or model is written after a non-finite loss.
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

    def check(self, last_checkpoint: Path | None) -> None:
        if self.first_step is None or int(self.first_step) < 0:
            return
        raise VqgenError(
            f"the loss became {float(self.value)} at step {int(self.first_step)}; nothing was saved after it. "
            f"Last good checkpoint: {last_checkpoint or 'none'}. {self.advice}, then --resume_from_checkpoint latest"
        )


def train_loaders(train, validation, accelerator, per_device: int, tc: BaseTrainConfig, workers: int):
    """(train loader, validation loader, streaming): the one data path of both trainers.

    A map-style split gets a shuffled, seeded loader that the caller prepares; a stream (`StreamBatches`) gets its
    own loader (`stream_loader`: not prepared, its position checkpointed). Validation is map-style either way."""
    if isinstance(train, StreamBatches):
        _, val_dl = make_loaders(None, validation, per_device, tc, workers)
        return stream_loader(train, accelerator, per_device, workers, tc.stop_signals), val_dl, True
    train_dl, val_dl = make_loaders(train, validation, per_device, tc, workers)
    if len(train_dl) == 0:
        raise VqgenError(f"the train split has {len(train)} rows, fewer than one batch of {per_device}")
    return train_dl, val_dl, False


def endless_batches(accelerator, train_dl, streaming: bool, step: int, accumulation: int, max_steps: int):
    """Training batches from optimizer step `step` on, epoch after epoch.

    Map-style: optimizer steps x accumulation = micro-batches consumed, and the seedable sampler makes epoch e's
    order a function of (seed, e), so skipping that many batches reproduces the uninterrupted run. The epoch is
    also set on the dataset itself (augmentation draws from it): accelerate forwards `set_epoch` to the dataset
    only when one process runs. A stream's loader restores its position from the checkpoint instead and never
    ends. Nothing when `step` is already `max_steps` (a finished run resumed: a requeue after the last save)."""
    if step >= max_steps:
        return
    if streaming:
        yield from train_dl
        return
    epoch, skip = divmod(step * accumulation, len(train_dl))
    while True:
        train_dl.set_epoch(epoch)
        if hasattr(train_dl.dataset, "set_epoch"):
            train_dl.dataset.set_epoch(epoch)
        yield from accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        skip, epoch = 0, epoch + 1


def due(step: int, tc: BaseTrainConfig) -> tuple[bool, bool, bool, bool]:
    """(last, log, evaluate, save) at optimizer step `step`: each every so many steps, and all at the last."""
    last = step >= tc.max_steps
    log_now = step % tc.log_every == 0 or last
    eval_now = bool(tc.eval_every) and (step % tc.eval_every == 0 or last)
    save_now = bool(tc.checkpoint_every) and (step % tc.checkpoint_every == 0 or last)
    return last, log_now, eval_now, save_now


@dataclass
class StepPlan:
    """What an optimizer step does beside the model's own work (`Bookkeeper.plan`)."""

    last: bool
    log: bool
    evaluate: bool
    save: bool
    stop: bool


class Bookkeeper:
    """The loop bookkeeping both trainers share, around their own logging and evaluation:

    plan = book.plan(step, loss)     # progress bar, non-finite guard, what is due, whether to stop
    if plan.log: ...                  # the trainer's own
    if plan.evaluate: ...
    if book.close(step, plan): break  # the checkpoint (and the stop's exit 75), the end of the run
    """

    def __init__(self, accelerator, tc: BaseTrainConfig, stopper: Stopper, guard, bar, resume_dir, stream):
        self.accelerator, self.tc, self.stopper, self.guard, self.bar = accelerator, tc, stopper, guard, bar
        self.last_checkpoint, self.stream = resume_dir, stream

    def plan(self, step: int, loss) -> StepPlan:
        self.bar.update(1)
        self.guard.observe(loss, step)
        last, log_now, eval_now, save_now = due(step, self.tc)
        stop = self.stopper.should_stop(self.accelerator) and not last  # every rank agrees (one all-reduced flag)
        save_now = save_now or stop
        if log_now or eval_now or save_now:
            self.guard.check(self.last_checkpoint)  # one host sync, and never a save after a non-finite loss
        return StepPlan(last, log_now, eval_now, save_now, stop)

    def close(self, step: int, plan: StepPlan) -> bool:
        """Save what the plan says (a stop's checkpoint, then exit 75); True at the run's last step."""
        if plan.save:
            note = self.stopper.note() if plan.stop else None
            self.last_checkpoint = save_checkpoint(
                self.accelerator, step, note, self.tc.checkpoints_total_limit, self.stream
            )
        if plan.stop:
            self.bar.close()  # before the stop's message (else tqdm redraws the bar at interpreter exit, after it)
            stop_run(self.accelerator, self.stopper, step, self.last_checkpoint)
        return plan.last


def prepare_run(accelerator, objects: list, train_dl, val_dl, streaming: bool):
    """accelerator.prepare of the models and optimizers with the loaders, in one call; a stream's loader is not
    prepared (see `train_loaders`). Returns (prepared objects, train loader, validation loader)."""
    loaders = [val_dl] if streaming else [train_dl, val_dl]
    check_fsdp_wrap(accelerator, objects[0])
    prepared = accelerator.prepare(*objects, *loaders)
    objects, loaders = list(prepared[: len(objects)]), list(prepared[len(objects) :])
    return (objects, train_dl, loaders[0]) if streaming else (objects, loaders[0], loaders[1])


def check_run(accelerator, args, out: Path) -> Path | None:
    """The checkpoint to resume from, if any, with the output folder checked by every rank (read-only, so every
    rank stops with the same error) before anything is written.

    `auto` without a complete checkpoint starts afresh: in an empty folder, or over a start that a signal or a kill
    ended before its first checkpoint; a folder that holds a finished model and no checkpoint is refused."""
    resume_dir = resolve_resume(args.resume_from_checkpoint, out / "checkpoints")
    if args.resume_from_checkpoint == "auto" and resume_dir is None:
        found = sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*")) if out.is_dir() else []
        if found:  # never delete a run that holds checkpoints, even incomplete ones: a person should look
            raise VqgenError(
                f"--resume_from_checkpoint auto: {out / 'checkpoints'} holds {', '.join(found)} but none is complete "
                f"(no {STATE_FILE}: a save was killed), so there is nothing to resume and nothing was deleted. Pass "
                "--overwrite_output_dir to start the run again, or choose another --output_dir",
                every_rank=True,
            )
        if (out / "model").exists():
            raise VqgenError(
                f"--resume_from_checkpoint auto: {out} holds a finished model and no checkpoint to continue. Pass "
                "--overwrite_output_dir to train it again, or choose another --output_dir",
                every_rank=True,
            )
        args.overwrite_output_dir = True  # nothing to continue: what is there is a start that never checkpointed
        if accelerator.is_main_process:
            logging.getLogger(__name__).info("--resume_from_checkpoint auto: no checkpoint in %s, from step 0", out)
    check_output_dir(out, resume=resume_dir is not None, overwrite=args.overwrite_output_dir)
    accelerator.wait_for_everyone()  # every rank has checked before the main process writes there
    return resume_dir


def open_run(accelerator, args, out: Path, cfg, resume_dir: Path | None, files: dict | None = None) -> None:
    """Once the data has loaded (so a failed start leaves no run behind): the main process prepares the output
    folder and writes the resolved config (and `files`, name -> JSON); then every rank is seeded."""
    from accelerate.utils import set_seed

    if accelerator.is_main_process:
        prepare_output_dir(out, resume=resume_dir is not None, overwrite=args.overwrite_output_dir)
        dump_yaml(out / "config.yaml", to_dict(cfg))
        for name, obj in (files or {}).items():
            write_json(out / name, obj)
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)


def check_schedule(tc: BaseTrainConfig) -> None:
    """Say at the start when a short run's intervals do not fit it: a checkpoint interval at or past max_steps
    (a kill before the end loses everything) and a warmup at or past max_steps (the LR never reaches its peak)."""
    log = logging.getLogger(__name__)
    if tc.checkpoint_every and tc.checkpoint_every >= tc.max_steps:
        log.warning(
            "train.checkpoint_every=%d is not below train.max_steps=%d: this run saves a checkpoint only at its end, "
            "and a kill before then loses it all; set train.checkpoint_every=%d (a quarter of the run)",
            tc.checkpoint_every, tc.max_steps, max(1, tc.max_steps // 4),
        )  # fmt: skip
    if tc.warmup_steps >= tc.max_steps:
        log.warning(
            "train.warmup_steps=%d is not below train.max_steps=%d: the learning rate never leaves warmup (it ends "
            "at %.2g of train.learning_rate); set train.warmup_steps=%d (a tenth of the run) for a short run",
            tc.warmup_steps, tc.max_steps, tc.max_steps / tc.warmup_steps, max(0, tc.max_steps // 10),
        )  # fmt: skip


def run_stopper(tc: BaseTrainConfig) -> Stopper:
    """Signals and the time budget of a training run (vqgen.preemption): the budget counts from now, the signals
    are caught inside `with stopper:` around the training loop. Also says whether the schedule fits the run."""
    check_schedule(tc)
    return Stopper(tc.stop_signals, tc.max_time)


def stop_run(accelerator, stopper: Stopper, step: int, checkpoint: Path) -> None:
    """After the stop's checkpoint: say where it is and how to continue, and exit with EXIT_PREEMPTED (75)."""
    accelerator.wait_for_everyone()
    message = (
        f"stopped at step {step} ({stopper.reason}); complete checkpoint {checkpoint}. The same command with "
        f"--resume_from_checkpoint auto continues it (exit code {EXIT_PREEMPTED})"
    )
    logging.getLogger(__name__).warning(message)
    if not accelerator.is_main_process:  # every rank's log says it (a rank's logger is quiet below warnings)
        print(f"[rank {accelerator.process_index}] {message}", flush=True)
    mark_stopped(stopper.reason, str(checkpoint))
    accelerator.end_training()
    raise SystemExit(EXIT_PREEMPTED)


def backward_and_step(accelerator, model, optimizer, loss, step: int, tc: BaseTrainConfig) -> float:
    """Inside `accumulate`: backward, clipping at sync, the LR of this optimizer step, the step. Returns the LR."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and tc.max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
    lr = lr_at(step, tc.learning_rate, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr
