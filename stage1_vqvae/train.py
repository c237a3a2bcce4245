"""Train the stage-1 VQ-VAE with Accelerate.

    python -m stage1_vqvae.train --config configs/mnist/stage1.yaml
    accelerate launch -m stage1_vqvae.train --config configs/cifar10/stage1.yaml train.batch_size=256
    accelerate launch --config_file configs/accelerate/ddp_bf16.yaml -m stage1_vqvae.train --config ...
    python -m stage1_vqvae.train --config configs/mnist/stage1.yaml --resume latest
    # two CPU processes (what `accelerate launch --cpu` cannot start without mpirun):
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m stage1_vqvae.train --config ...

Overrides are dotted `section.key=value` (sections: data, model, train). `train.batch_size` is the global batch
of one optimizer step; each process gets batch_size / (processes * gradient_accumulation_steps).
The run folder holds config.yaml (resolved), checkpoints/step_XXXXXXXX, logs/ (tensorboard), samples/ and
model/ (save_pretrained: model.safetensors, config.json, README.md, data_config.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import DistributedDataParallelKwargs
from accelerate.utils import set_seed

from stage1_vqvae.common import (
    STATE_FILE,
    LossWatch,
    VqgenError,
    atomic_dir,
    build_accelerator,
    commit_dir,
    dump_yaml,
    init_trackers,
    load_config,
    lr_at,
    prepare_output_dir,
    resolve_resume,
    run_cli,
    save_checkpoint,
    to_dict,
    write_json,
)
from stage1_vqvae.data import DataConfig, load_splits, to_model_input
from stage1_vqvae.evaluate import evaluate_model
from stage1_vqvae.model import VQVAE, VQVAEConfig

logger = logging.getLogger("stage1_vqvae.train")


@dataclass
class TrainConfig:
    output_dir: str = "runs/stage1"
    seed: int = 0
    batch_size: int = 128  # global batch per optimizer step (paper: 128)
    gradient_accumulation_steps: int = 1
    max_steps: int = 10000
    learning_rate: float = 2e-4  # paper: Adam 2e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # cosine floor as a fraction of learning_rate; 1.0 = constant (the paper)
    max_grad_norm: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    log_every: int = 50
    eval_every: int = 1000  # 0 disables periodic validation
    eval_max_batches: int | None = 20
    checkpoint_every: int = 1000  # 0 disables checkpoints
    checkpoints_total_limit: int = 2
    num_workers: int = 0
    channels_last: bool = True
    compile: bool = False  # torch.compile through Accelerate's dynamo plugin
    push_to_hub: str | None = None  # Hub repo id: upload model/ when training ends (token from `hf auth login`)

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class Stage1Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def resolve_model_config(cfg: Stage1Config) -> VQVAEConfig:
    """The image geometry is the data's: model.image_size/in_channels follow data.resolution/channels."""
    channels = 1 if cfg.data.channels == "L" else 3
    try:
        return dataclasses.replace(cfg.model, image_size=cfg.data.resolution, in_channels=channels)
    except ValueError as e:
        raise VqgenError(f"model: {e} (data.resolution sets model.image_size)") from None


def save_image_grid(top: torch.Tensor, bottom: torch.Tensor, path: Path) -> torch.Tensor:
    """Two rows (originals over reconstructions) of [-1, 1] images -> PNG; returns the (H, W, C) uint8 grid."""
    from torchvision.utils import make_grid, save_image

    both = torch.cat([top, bottom]).float().clamp(-1, 1).add(1).div(2).cpu()  # (2n, C, H, W) in [0, 1]
    grid = make_grid(both, nrow=len(top), padding=2)
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(grid, tmp, format="png")
    tmp.replace(path)
    return (grid * 255).round().byte().permute(1, 2, 0)  # (H, W, 3)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file (see configs/)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    args, overrides = parser.parse_known_args(argv)
    cfg: Stage1Config = load_config(Stage1Config, args.config, overrides)
    cfg.model = resolve_model_config(cfg)
    tc = cfg.train
    out = Path(tc.output_dir)

    # Every rank computes the same (all-reduced) codebook, so DDP need not broadcast buffers each step.
    accelerator, per_device = build_accelerator(tc, out, [DistributedDataParallelKwargs(broadcast_buffers=False)])

    resume_dir = resolve_resume(args.resume, out / "checkpoints") if args.resume else None
    if accelerator.is_main_process:
        prepare_output_dir(out, resume=args.resume is not None, overwrite=args.overwrite)
        dump_yaml(out / "config.yaml", to_dict(cfg))
    accelerator.wait_for_everyone()
    set_seed(tc.seed)

    with accelerator.main_process_first():
        splits = load_splits(cfg.data, splits=("train", "validation"), progress=accelerator.is_main_process)
    train_dl = torch.utils.data.DataLoader(
        splits["train"], batch_size=per_device, shuffle=True, drop_last=True, num_workers=tc.num_workers
    )
    val_dl = torch.utils.data.DataLoader(splits["validation"], batch_size=max(per_device, 64))
    if len(train_dl) == 0:
        raise VqgenError(f"the train split has {len(splits['train'])} images, fewer than one batch of {per_device}")

    model = VQVAE(cfg.model)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay
    )
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)

    step = 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        step = json.loads((resume_dir / STATE_FILE).read_text())["step"]
        logger.info("resumed from %s at step %d", resume_dir, step)
    init_trackers(accelerator, "stage1_vqvae", cfg)

    # Data position: optimizer steps * accumulation = micro-batches consumed; the seedable sampler makes
    # epoch e's order a function of (seed, e), so skipping reproduces the uninterrupted run.
    per_epoch = len(train_dl)
    consumed = step * tc.gradient_accumulation_steps
    epoch, skip = divmod(consumed, per_epoch)

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.max_steps, initial=step, desc="stage 1", disable=not accelerator.is_main_process)
    last_ckpt = resume_dir
    t0, images_seen = time.perf_counter(), 0
    val_metrics: dict = {}
    watch = LossWatch("Lower train.learning_rate or set train.max_grad_norm")
    while step < tc.max_steps:
        train_dl.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        skip = 0
        for batch in loader:
            x = to_model_input(batch["images"])
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = model(x)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and tc.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                lr = lr_at(step, tc.learning_rate, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            images_seen += x.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            # The loss is read on the host (a sync) only when something is due, never saved after a non-finite one.
            log_now, eval_now, save_now = watch.after_step(outputs.loss, step, tc, last_ckpt)
            if log_now:
                loss = outputs.loss.item()
                logs = {
                    "train/loss": loss,
                    "train/recon_loss": outputs.recon_loss.item(),
                    "train/commitment_loss": outputs.commitment_loss.item(),
                    "train/codebook_loss": outputs.codebook_loss.item(),
                    "train/perplexity": outputs.perplexity.item(),
                    "train/usage": outputs.usage.item(),
                    "train/dead_codes": int(outputs.dead_codes),
                    "train/lr": lr,
                    "train/images_per_s": images_seen / (time.perf_counter() - t0),
                }
                accelerator.log(logs, step=step)
                bar.set_postfix(loss=f"{loss:.4f}", ppl=f"{logs['train/perplexity']:.0f}")
            if eval_now:
                val_metrics = validate(model, val_dl, accelerator, step, out, tc.eval_max_batches)
            if save_now:
                last_ckpt = save_checkpoint(accelerator, out / "checkpoints", step, tc.checkpoints_total_limit)
            if step >= tc.max_steps:
                break
        epoch += 1
    bar.close()

    accelerator.wait_for_everyone()
    wall = time.perf_counter() - t0
    # Every rank must hold the same codebook (all-reduced EMA, broadcast restarts): check, do not assume.
    embed = accelerator.unwrap_model(model).quantizer.embed.detach()
    gathered = accelerator.gather(embed.unsqueeze(0))  # (world, K, D)
    rank_diff = (gathered - gathered[:1]).abs().max().item()
    if not val_metrics:
        val_metrics = validate(model, val_dl, accelerator, step, out, tc.eval_max_batches)
    if accelerator.is_main_process:
        save_final_model(accelerator.unwrap_model(model), out / "model", cfg, val_metrics, out)
        if tc.push_to_hub:
            from stage1_vqvae.hub import upload_folder

            logger.info("pushed %s", upload_folder(out / "model", tc.push_to_hub))
        write_json(
            out / "train_summary.json",
            {
                "steps": step,
                "num_processes": accelerator.num_processes,
                "wall_time_s": wall,
                "images_per_s": images_seen / wall if wall > 0 else None,
                "codebook_max_abs_diff_across_ranks": rank_diff,
                "validation": val_metrics,
            },
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "model"


def validate(model, val_dl, accelerator, step: int, out: Path, max_batches: int | None) -> dict:
    metrics = evaluate_model(model, val_dl, accelerator, max_batches=max_batches)
    accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        # Straight from the dataset: iterating a prepared loader on one rank only could hang a collective.
        images = val_dl.dataset.images[:8].to(accelerator.device)
        with torch.no_grad():
            x = to_model_input(images)
            recon = unwrapped.decode_codes(unwrapped.encode(x))
        (out / "samples").mkdir(exist_ok=True)
        grid = save_image_grid(x, recon, out / "samples" / f"reconstructions_step_{step:08d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"val/reconstructions": grid.numpy()}, step=step, dataformats="HWC")
        logger.info("step %d validation: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def save_final_model(model: VQVAE, final: Path, cfg: Stage1Config, metrics: dict, run_dir: Path) -> None:
    """save_pretrained into a temp folder with the data config and a card image, then rename into place."""
    tmp = atomic_dir(final)
    recon = sorted((run_dir / "samples").glob("reconstructions_step_*.png"))
    if recon:
        shutil.copy(recon[-1], tmp / "reconstructions.png")
    card = {
        "metrics": {f"validation {k}": round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
        "training_data": cfg.data.source,
        "image": "reconstructions.png" if recon else None,
        "image_size": cfg.model.image_size,
        "in_channels": cfg.model.in_channels,
        "grid": cfg.model.grid_size,
        "codebook_size": cfg.model.codebook_size,
        "codebook_dim": cfg.model.codebook_dim,
    }
    model.save_pretrained(tmp, model_card_kwargs=card)
    write_json(tmp / "data_config.json", to_dict(cfg.data))
    dump_yaml(tmp / "training_config.yaml", to_dict(cfg))
    commit_dir(tmp, final)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
