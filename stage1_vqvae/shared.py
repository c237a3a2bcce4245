"""Shared by both stages: user errors and the CLI wrapper, typed configs, atomic files, the LR schedule, the
TrainConfig base, the Accelerator set-up, checkpoints and the non-finite-loss guard.

Stage 2 imports this module, `hub` and `codes`, never stage 1's model, data or training code.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import sys
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml


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
    is printed by rank 0 alone, any other by the rank that met it.
    """
    try:
        main(argv)
    except VqgenError as e:
        if os.environ.get("RANK", "0") == "0" or not e.every_rank:
            print(f"error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def user_message(e: VqgenError) -> str:
    """The error's own line. A DataLoader worker's error arrives re-raised in the main process with the worker's
    traceback folded into the message ("Caught VqgenError in DataLoader worker process 0. Original
    Traceback ..."); its last line is what the worker raised."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split("VqgenError: ", 1)[-1]
    return text


# --------------------------------------------------------------------------------------------------
# Typed configs: dataclasses are the schema, YAML holds values, dotted CLI overrides win.


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and coerce int -> float) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where)
            except VqgenError as e:
                errors.append(str(e))
        raise VqgenError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise VqgenError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise VqgenError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    # bool is an int subclass: `true` must not pass as an integer, nor 1 as a boolean.
    ok = {float: (int, float), int: (int,), bool: (bool,), str: (str,), dict: (dict,)}.get(origin or tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp} at {where}")
    if not isinstance(value, ok) or (tp is not bool and isinstance(value, bool)):
        raise VqgenError(f"{where}: expected {type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


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
        raise VqgenError(f"{where}: unknown key(s) {unknown}. Valid keys: {names}. Fix the spelling")
    try:
        return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()})
    except (ValueError, TypeError) as e:
        raise VqgenError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def type_name(tp: Any) -> str:
    """`int | None` -> 'integer or null', Literal -> 'one of [...]' (for errors and --help)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin in (list, tuple):
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a mapping"}
    return names.get(origin or tp, str(tp))


def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the dataclass's source: the one place a field is documented."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def config_help(cls: type) -> str:
    """Every key of a sectioned config dataclass with its type, default and comment (for --help)."""
    lines = []
    for section in dataclasses.fields(cls):
        scls = typing.get_type_hints(cls)[section.name]
        hints, comments = typing.get_type_hints(scls), _field_comments(scls)
        default = scls()
        for f in dataclasses.fields(scls):
            value = json.dumps(getattr(default, f.name))
            note = f"  {comments[f.name]}" if f.name in comments else ""
            lines.append(f"  {section.name}.{f.name}={value}  ({type_name(hints[f.name])}){note}")
    return "\n".join(lines)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string and `no`/`off`/`yes`/`on` as booleans
    (so `train.mixed_precision=no` became False); YAML 1.2 and every user mean a float and a word."""


# YAML 1.2's booleans: true and false only. The class's resolver table is rebuilt, not edited in place, so
# yaml.SafeLoader itself keeps its own.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def parse_overrides(items: list[str], cls: type | None = None) -> dict:
    """`a.b=1 --c.d=x --e.f g` -> nested dict; values parsed as YAML scalars (so 1e-3, true, null work).

    With `cls` (a sectioned config), a flag without a section (`--max_steps 5`) is answered with the dotted
    form it should take (`train.max_steps=5`).
    """
    out: dict = {}
    i = 0
    while i < len(items):
        item = items[i]
        key = item[2:] if item.startswith("--") else item
        if "=" in key:
            key, raw = key.split("=", 1)
        elif item.startswith("--") and "." in key and i + 1 < len(items):
            i += 1
            raw = items[i]
        else:
            raise VqgenError(f"cannot parse {item!r}: {_override_hint(key, cls)}")
        if "." not in key:
            raise VqgenError(f"{item!r} has no section: {_override_hint(key, cls)}")
        value = load_yaml(raw) if raw != "" else ""
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise VqgenError(f"override {item!r} conflicts with another override of {p!r}")
        node[leaf] = value
        i += 1
    return out


def _override_hint(key: str, cls: type | None) -> str:
    key = key.lstrip("-").replace("-", "_")
    if cls is not None and "." not in key:
        for section in dataclasses.fields(cls):
            scls = typing.get_type_hints(cls)[section.name]
            if key in {f.name for f in dataclasses.fields(scls)}:
                return f"write config keys as {section.name}.{key}=VALUE (see --help)"
    return "write config keys as section.key=VALUE (see --help for every key)"


def deep_update(base: dict, new: dict) -> dict:
    merged = dict(base)
    for k, v in new.items():
        merged[k] = deep_update(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _configs_root():
    """The repo's configs/ folder: beside the package in a checkout (or editable install), inside it in a wheel."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    return checkout if checkout.is_dir() else resources.files("stage1_vqvae.configs")


def builtin_configs() -> list[str]:
    """Names of the configs shipped with vqgen (`mnist/stage1.yaml`, ...)."""
    root = _configs_root()
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name != "accelerate"]  # launch configs, not vqgen's
    return sorted(f"{d.name}/{f.name}" for d in dirs for f in d.iterdir() if f.name.endswith(".yaml"))


def resolve_config_path(path: str) -> Path:
    """A YAML path as given, else one of the built-in configs by name (works from an installed wheel)."""
    p = Path(path)
    if p.is_file():
        return p
    name = path.removeprefix("configs/")
    candidate = _configs_root().joinpath(name if name.endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return Path(str(candidate))
    raise VqgenError(f"config file {path} does not exist. Pass a YAML file, or one of {builtin_configs()}")


def load_config(cls: type, path: str | None, overrides: list[str]) -> Any:
    """YAML file + dotted overrides -> validated dataclass `cls`."""
    data: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise VqgenError(f"config file {p} is not valid YAML: {e}") from None
    data = deep_update(data, parse_overrides(overrides, cls))
    if hasattr(cls, "derived_keys"):  # keys that follow others (stage 1: the model's image geometry)
        data = cls.derived_keys(data)
    return from_dict(cls, data)


def dump_yaml(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Files: atomic folders and JSON, safe names.


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


def release_freed_memory() -> None:
    """Return to the OS the memory glibc's malloc keeps after it is freed. Under PyTorch's CPU kernels its arenas
    fragment, and a long loop's heap creeps up with the number of batches (extraction: +30% from 70k to 620k
    images) although nothing is held; calling this once per batch keeps it flat (it takes well under a millisecond
    there). Its cost is the pages the next allocations fault in again: stage-1 training calls it at most every
    few seconds (once a step cost the demo 22% of its speed). A no-op off glibc."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


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


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def unit_images(images: torch.Tensor) -> torch.Tensor:
    """Model images (B, C, H, W) in [-1, 1] -> float CPU images in [0, 1]: the one conversion for output."""
    return images.detach().float().clamp(-1, 1).add(1).div(2).cpu()


def save_image_grid(rows: list[torch.Tensor], path: Path, min_side: int = 112) -> torch.Tensor:
    """Rows of [-1, 1] images (each (n, C, H, W)) -> one PNG written atomically; returns it as (H, W, 3) uint8.

    Small images are enlarged (nearest neighbour, a whole factor) to about `min_side` pixels, so that a grid of
    28x28 digits reads on a model card instead of being a thumbnail.
    """
    from torchvision.utils import make_grid, save_image

    images = unit_images(torch.cat(rows))  # (n_rows * n, C, H, W) in [0, 1]
    scale = max(1, min_side // images.shape[-1])
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=len(rows[0]), padding=2 * scale)  # (3, H, W)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(grid, tmp, format="png")
    tmp.replace(path)
    return grid.mul(255).round().byte().permute(1, 2, 0)


def report_metrics(result: dict, output_dir: str | None) -> None:
    """An evaluation CLI's output: metrics.json in output_dir, and the JSON printed. Call it on the main process
    only."""
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(output_dir) / "metrics.json", result)
    print(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------------------
# Training: the config both stages extend, the LR schedule, the Accelerator, checkpoints, the NaN guard.


@dataclass
class BaseTrainConfig:
    output_dir: str = "runs/run"
    seed: int = 0
    batch_size: int = 64  # global batch of one optimizer step, over all processes and accumulation steps
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of learning_rate; 1.0 = constant
    max_grad_norm: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None  # null: what `accelerate launch` says
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    log_every: int = 50
    eval_every: int = 500  # 0 disables periodic validation
    eval_max_batches: int | None = 20  # null: the whole validation split
    checkpoint_every: int = 500  # 0 disables checkpoints
    checkpoints_total_limit: int = 2
    num_workers: int | None = None  # DataLoader workers; null: 0 for data in memory, up to 4 when decoding on the fly
    compile: bool = False  # torch.compile through Accelerate's dynamo plugin
    push_to_hub: bool = False  # upload model/ when training ends (token from `hf auth login`)
    hub_model_id: str | None = None  # the Hub repo for push_to_hub (owner/name)

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
    parser.add_argument("--resume_from_checkpoint", default=None, metavar="latest|PATH", help="continue a run")
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

    Checkpoints are named by accelerate (`checkpoints/checkpoint_<step>`, pruned to
    `checkpoints_total_limit`); `save_checkpoint` sets the iteration to the step before each save.
    """
    import logging

    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin

    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,  # None: accelerate's launcher or environment decides
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        log_with=None if tc.report_to == "none" else tc.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(out),
            logging_dir=str(out / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=tc.checkpoints_total_limit or None,
        ),
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


def make_loaders(train, validation, per_device: int, tc: BaseTrainConfig, num_workers: int | None = None):
    """The train loader (shuffled, seeded) and the validation loader of both trainers.

    Each loader has its own generator: a DataLoader without one draws a base seed from the global RNG every
    time an iterator starts, and a resumed run starts one mid-epoch where the uninterrupted run did not, which
    shifted every later global-RNG draw (dead-code restarts, dropout) and broke bit-exact resume.
    """
    workers = num_workers if num_workers is not None else (tc.num_workers or 0)
    train_dl = None  # a stream (None here) gets its own loader
    if train is not None:
        train_dl = torch.utils.data.DataLoader(
            train,
            batch_size=per_device,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            generator=torch.Generator().manual_seed(tc.seed),
        )
    val_dl = torch.utils.data.DataLoader(
        validation,
        batch_size=per_device,  # the training batch: a larger one would set the peak memory of big images
        num_workers=workers,
        generator=torch.Generator().manual_seed(tc.seed),
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


CKPT_RE = re.compile(r"^checkpoint_(\d+)$")
STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their state file exists), oldest first."""
    if not Path(ckpt_root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_root).iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted((s, p) for s, p in found if (p / STATE_FILE).is_file())


def resolve_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """`latest` -> newest complete checkpoint; a path -> that checkpoint; None -> None."""
    if resume in (None, "", "none"):
        return None
    if resume == "latest":
        ckpts = list_checkpoints(ckpt_root)
        if not ckpts:
            raise VqgenError(
                f"--resume_from_checkpoint latest: {ckpt_root} holds no complete checkpoint. "
                "Drop the flag to start a new run",
                every_rank=True,
            )
        return ckpts[-1][1]
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise VqgenError(f"--resume_from_checkpoint {resume}: not a complete checkpoint (no {STATE_FILE}); try latest")
    return p


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


def save_checkpoint(accelerator, step: int) -> Path:
    """accelerate's save_state into checkpoints/checkpoint_<step>; the state file written last marks it complete."""
    final = Path(accelerator.project_dir) / "checkpoints" / f"checkpoint_{step}"
    if accelerator.is_main_process and final.exists():
        shutil.rmtree(final)  # an incomplete save of this step from a killed run
    accelerator.wait_for_everyone()
    accelerator.project_configuration.iteration = step  # names the folder by step, also after a resume
    accelerator.save_state()
    if accelerator.is_main_process:
        write_json(final / STATE_FILE, {"step": step})
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> int:
    """Restore a checkpoint of `save_checkpoint`; returns its step."""
    accelerator.load_state(str(checkpoint))
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())["step"]


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


# --------------------------------------------------------------------------------------------------
# Streamed training data, for both stages


class StreamBatches(torch.utils.data.IterableDataset):
    """The train split of a `datasets` stream as an endless sequence of batches; subclasses turn rows into
    tensors (`make_batch`).

    Every rank reads its own part of the stream and every DataLoader worker its own part of that (whole shards
    when there are enough); rows pass through a shuffle buffer, and epochs roll over inside each worker, so
    training runs by steps and no rank waits for another's stream to end. Each batch carries its worker's
    position after it (the epoch and `IterableDataset.state_dict()`); `StreamPosition` keeps the position of
    the last batch consumed per worker, and a resumed run continues each worker's stream from there (datasets
    restores the shard and the row in it; the rows that sat in the shuffle buffer are not replayed, so a
    resumed stream is row for row the uninterrupted one only with a buffer of 1).
    """

    def __init__(self, raw, seed: int, shuffle_buffer: int, source: str):
        self.raw, self.seed, self.shuffle_buffer, self.source = raw, seed, shuffle_buffer, source
        self.batch_size, self.rank, self.world = 1, 0, 1
        # {"num_workers", "workers": {worker: {"epoch", "rows", "stream"}}, "next_worker"}
        self.resume: dict | None = None

    def configure(self, batch_size: int, rank: int, world: int):
        self.batch_size, self.rank, self.world = batch_size, rank, world
        return self

    def make_batch(self, rows: dict, worker: int, epoch: int, first_row: int) -> dict:
        """Columns of `batch_size` rows -> the batch's tensors."""
        raise NotImplementedError

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        state = None
        if self.resume is not None:
            if self.resume["num_workers"] != n_workers:
                raise VqgenError(
                    f"this run was checkpointed with train.num_workers={self.resume['num_workers']}; a streamed "
                    f"source resumes only with the same number (got {n_workers})"
                )
            # The DataLoader takes batches from its workers in turn, starting at worker 0: the worker that
            # comes after the last batch consumed plays worker 0, so a resumed run takes the same order.
            worker = (worker + self.resume.get("next_worker", 0)) % n_workers
            state = self.resume["workers"].get(worker)
        epoch = state["epoch"] if state else 0
        # Rows this worker has made: a streamed row's augmentation is drawn from it, so resume restores it too.
        made = state.get("rows", 0) if state else 0
        while True:
            ds = self.raw.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(epoch)
            # Sharding here and reading through .iter() keeps datasets from sharding by worker again, and keeps
            # state_dict and load_state_dict on the same structure (datasets restores a worker-sharded state
            # into the unsharded stream and fails).
            ds = split_dataset_by_node(ds, self.rank * n_workers + worker, self.world * n_workers)
            resumed = state is not None and state["epoch"] == epoch
            if resumed:
                ds.load_state_dict(state["stream"])
            batches = 0
            for rows in ds.iter(batch_size=self.batch_size, drop_last_batch=True):
                batch = self.make_batch(rows, worker, epoch, made)
                made += self.batch_size
                position = {"worker": worker, "epoch": epoch, "rows": made, "stream": ds.state_dict()}
                yield {**batch, "position": position}
                batches += 1
            if batches == 0 and not resumed:  # (a resumed position may sit at the end of an epoch)
                raise VqgenError(
                    f"{self.source}: rank {self.rank} worker {worker} got less than one batch ({self.batch_size} "
                    "rows) from the stream; lower train.num_workers or train.batch_size"
                )
            epoch += 1  # the last partial batch is dropped, like drop_last on a map-style split


class StreamPosition:
    """The stream position of every worker after the last batch the trainer consumed; checkpointed through
    `accelerator.register_for_checkpointing`."""

    def __init__(self, dataset: StreamBatches, num_workers: int):
        self.dataset, self.num_workers = dataset, max(1, num_workers)
        self.workers: dict[int, dict] = {}
        self.next_worker = 0

    def update(self, position: dict) -> None:
        worker = int(position["worker"])
        self.workers[worker] = {
            "epoch": int(position["epoch"]),
            "rows": int(position["rows"]),
            "stream": position["stream"],
        }
        self.next_worker = (worker + 1) % self.num_workers

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "workers": dict(self.workers), "next_worker": self.next_worker}

    def load_state_dict(self, state: dict) -> None:
        self.workers = dict(state["workers"])
        self.next_worker = int(state.get("next_worker", 0))
        self.dataset.resume = {
            "num_workers": state["num_workers"],
            "workers": self.workers,
            "next_worker": self.next_worker,
        }


def stream_loader(dataset: StreamBatches, accelerator, per_device: int, workers: int):
    """(DataLoader, StreamPosition) of a stream: not prepared by accelerate (whose batch dispatching would have
    rank 0 read for all), batches moved to the device by the loop; the position is saved with checkpoints."""
    dataset.configure(per_device, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: a DataLoader without one draws its base seed from the global RNG whenever an
        # iterator starts, which a resumed run does where the uninterrupted one did not (dropout would shift).
        generator=torch.Generator().manual_seed(dataset.seed),
    )
    position = StreamPosition(dataset, workers)
    accelerator.register_for_checkpointing(position)  # before load_checkpoint, which restores it
    return loader, position
