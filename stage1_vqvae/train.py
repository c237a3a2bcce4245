"""Train the stage-1 VQ-VAE with Accelerate.

    python -m stage1_vqvae.train --config configs/mnist/stage1.yaml          # or --config mnist/stage1
    python -m stage1_vqvae.train --config mnist/stage1 --output_dir runs/a train.max_steps=100
    accelerate launch -m stage1_vqvae.train --config configs/cifar10/stage1.yaml train.batch_size=256
    accelerate launch --config_file configs/accelerate/ddp_bf16.yaml -m stage1_vqvae.train --config ...
    python -m stage1_vqvae.train --config configs/mnist/stage1.yaml --resume_from_checkpoint latest
    # two CPU processes (what `accelerate launch --cpu` cannot start without mpirun):
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m stage1_vqvae.train --config ...

Config keys are overridden as dotted `section.key=value` (sections: data, model, train; all listed below).
`train.batch_size` is the global batch of one optimizer step; each process gets batch_size / (processes *
gradient_accumulation_steps). The run folder holds config.yaml (resolved), checkpoints/checkpoint_<step>,
logs/ (tensorboard), samples/ and model/ (save_pretrained: model.safetensors, config.json, README.md,
data_config.json).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from stage1_vqvae.data import DataConfig, ImageSplit, LazyImageSplit, StreamingImages, load_splits, to_model_input
from stage1_vqvae.evaluate import evaluate_model
from stage1_vqvae.losses import LossConfig, PatchDiscriminator, VQGANLoss, check_discriminator
from stage1_vqvae.model import VQVAE, VQVAEConfig
from vqgen.cli import VqgenError, run_cli
from vqgen.config import to_dict
from vqgen.files import atomic_dir, commit_dir, dump_yaml, release_freed_memory, write_json
from vqgen.hub import hub_id, upload_folder
from vqgen.images import save_image_grid
from vqgen.streaming import stream_loader
from vqgen.training import (
    BaseTrainConfig,
    NonFiniteGuard,
    build_accelerator,
    check_output_dir,
    init_trackers,
    load_checkpoint,
    lr_at,
    make_loaders,
    parse_train_args,
    peak_accelerator_memory_gib,
    prepare_output_dir,
    resolve_resume,
    save_checkpoint,
    steady_rate,
)

logger = logging.getLogger("stage1_vqvae.train")
TRIM_INTERVAL_S = 2.0  # decoding on the fly: hand freed heap back to the OS at most this often


@dataclass
class TrainConfig(BaseTrainConfig):
    output_dir: str = "runs/stage1"
    batch_size: int = 128  # global batch of one optimizer step (paper: 128)
    max_steps: int = 10000
    learning_rate: float = 2e-4  # paper: Adam 2e-4
    min_lr_ratio: float = 1.0  # cosine floor as a fraction of learning_rate; 1.0 = constant (the paper)
    eval_every: int = 1000  # 0 disables periodic validation
    checkpoint_every: int = 1000  # 0 disables checkpoints
    channels_last: bool = True  # NHWC convolutions: ~1.4x faster on CPU


@dataclass
class Stage1Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # perceptual and adversarial terms; all 0: the paper
    train: TrainConfig = field(default_factory=TrainConfig)

    @staticmethod
    def derived_keys(raw: dict) -> dict:
        """model.image_size and model.in_channels follow data.resolution and data.channels, before the model's
        checks run (`data.resolution=128 model.downsample=8` must not be checked against the default 28)."""
        data, model, default = raw.get("data") or {}, raw.get("model") or {}, DataConfig()
        if not isinstance(data, dict) or not isinstance(model, dict):
            return raw  # from_dict names the problem
        model = dict(model)
        if isinstance(data.get("resolution", default.resolution), int):
            model["image_size"] = data.get("resolution", default.resolution)
        if data.get("channels", default.channels) in ("L", "RGB"):
            model["in_channels"] = 1 if data.get("channels", default.channels) == "L" else 3
        return {**raw, "model": model}


def main(argv: list[str] | None = None) -> Path:
    args, cfg = parse_train_args(__doc__, Stage1Config, argv)
    check_discriminator(cfg.loss, cfg.model.image_size)
    tc = cfg.train
    out = Path(tc.output_dir)

    # Every rank computes the same (all-reduced) codebook, so DDP need not broadcast buffers each step.
    accelerator, per_device = build_accelerator(tc, out, [DistributedDataParallelKwargs(broadcast_buffers=False)])
    resume_dir = resolve_resume(args.resume_from_checkpoint, out / "checkpoints")
    check_output_dir(out, resume=resume_dir is not None, overwrite=args.overwrite_output_dir)
    accelerator.wait_for_everyone()  # every rank has checked before the main process writes there
    # The perceptual network's weights are found (or missing: one error) before anything is written.
    criterion = VQGANLoss(cfg.loss, accelerator.device) if cfg.loss.enabled else None
    # The data loads before anything is written, so a failed start (a corrupt image, a missing folder, an
    # unreachable Hub) leaves no run behind and the same command works once the data is fixed.
    with accelerator.main_process_first():
        splits = load_splits(
            cfg.data,
            splits=("train", "validation"),
            progress=accelerator.is_main_process,
            augment_train=True,
            seed=tc.seed,
        )
    if accelerator.is_main_process:
        prepare_output_dir(out, resume=resume_dir is not None, overwrite=args.overwrite_output_dir)
        dump_yaml(out / "config.yaml", to_dict(cfg))
    accelerator.wait_for_everyone()
    set_seed(tc.seed)

    train_set = splits["train"]
    streaming = isinstance(train_set, StreamingImages)
    # Decoding on the fly wants workers; data already in memory does not (a worker only adds a copy).
    in_memory = all(isinstance(v, ImageSplit) for v in splits.values())
    workers = tc.num_workers
    if workers is None:
        workers = 0 if in_memory else LazyImageSplit.default_workers(accelerator.num_processes)
    train_dl, val_dl = make_loaders(None if streaming else train_set, splits["validation"], per_device, tc, workers)
    position = None
    if streaming:
        train_dl, position = stream_loader(train_set, accelerator, per_device, workers)
    elif len(train_dl) == 0:
        raise VqgenError(f"the train split has {len(train_set)} images, fewer than one batch of {per_device}")

    model = VQVAE(cfg.model)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay
    )
    # VQGAN's options: the discriminator is a model of its own with its own optimizer (betas 0.5, 0.9 as in
    # VQGAN), prepared, checkpointed and restored with the VQ-VAE; the frozen VGG stays outside.
    disc = disc_opt = None
    extra = []
    if cfg.loss.adversarial_weight > 0:
        disc = PatchDiscriminator(cfg.model.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers)
        disc_lr = cfg.loss.disc_learning_rate or tc.learning_rate
        disc_opt = torch.optim.Adam(disc.parameters(), lr=disc_lr, betas=(0.5, 0.9))
        extra = [disc, disc_opt]
    if streaming:
        model, optimizer, *extra, val_dl = accelerator.prepare(model, optimizer, *extra, val_dl)
    else:
        model, optimizer, *extra, train_dl, val_dl = accelerator.prepare(model, optimizer, *extra, train_dl, val_dl)
    if disc is not None:
        disc, disc_opt = extra
        if accelerator.scaler is not None:
            # fp16: the discriminator's own GradScaler. An AcceleratedOptimizer updates its scaler after every
            # step, so two optimizers on the launch's one would update it twice an iteration (PyTorch's recipe
            # updates once, after all have stepped); two losses over disjoint parameters may each have their own.
            d_scaler = torch.amp.GradScaler(accelerator.device.type)
            disc_opt.scaler = d_scaler
            accelerator.register_for_checkpointing(d_scaler)  # before load_checkpoint, which restores it
    last_layer = accelerator.unwrap_model(model).decoder.net[-1].weight  # where the adaptive weight is measured

    step = 0
    if resume_dir is not None:
        step = load_checkpoint(accelerator, resume_dir)
        logger.info("resumed from %s at step %d", resume_dir, step)
    init_trackers(accelerator, "stage1_vqvae", cfg)

    # Data position: optimizer steps * accumulation = micro-batches consumed; the seedable sampler makes
    # epoch e's order a function of (seed, e), so skipping reproduces the uninterrupted run. A stream
    # restores its position from the checkpoint instead (StreamPosition) and never ends.
    epoch, skip = 0, 0
    if not streaming:
        epoch, skip = divmod(step * tc.gradient_accumulation_steps, len(train_dl))

    bar = tqdm(total=tc.max_steps, initial=step, desc="stage 1", disable=not accelerator.is_main_process)
    last_ckpt = resume_dir
    t0, images_seen = time.perf_counter(), 0
    # The first log interval holds the warm-up (cuDNN autotuning, worker start-up, allocator growth): the
    # steady rate is measured after it.
    t_warm, images_warm = None, 0
    # Decoding on the fly, glibc's heap creeps up with the number of batches (fragmentation: +0.04 GiB from
    # 20 to 40 batches at 256 px); handing the freed memory back now and then keeps the peak flat. At most
    # every TRIM_INTERVAL_S: each trim makes the next steps fault their pages in again (-22% img/s on the
    # demo when done every step). Not in memory, where the data is what sets the memory.
    trim_on, last_trim = not in_memory, time.perf_counter()
    val_metrics: dict = {}
    guard = NonFiniteGuard("Lower train.learning_rate or set train.max_grad_norm")
    while step < tc.max_steps:
        if not streaming:
            train_dl.set_epoch(epoch)
            # accelerate forwards set_epoch to the dataset only when one process runs: the augmentation's
            # epoch is set here, before the loader's workers copy the dataset.
            train_set.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        skip = 0
        for batch in loader:
            if position is not None:
                position.update(batch["position"])
            x = to_model_input(batch["images"].to(accelerator.device, non_blocking=True))
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model, *([disc] if disc is not None else [])):
                with accelerator.autocast():
                    outputs = model(x)
                    loss, extra_logs = outputs.loss, {}
                    if criterion is not None:
                        unwrapped_disc = accelerator.unwrap_model(disc) if disc is not None else None
                        loss, extra_logs = criterion.generator_loss(outputs, x, step, last_layer, unwrapped_disc)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                lr = lr_at(step, tc.learning_rate, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if criterion is not None and criterion.adversarial_on(step):
                    with accelerator.autocast():
                        d_loss, d_logs = criterion.discriminator_loss(disc, x, outputs.reconstruction)
                    discriminator_backward(accelerator, d_loss, disc, disc_opt, tc.max_grad_norm)
                    for group in disc_opt.param_groups:
                        group["lr"] = lr_at(step, disc_lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
                    disc_opt.step()
                    disc_opt.zero_grad(set_to_none=True)
                    extra_logs.update(d_logs)
            images_seen += x.shape[0] * accelerator.num_processes
            if trim_on and time.perf_counter() - last_trim >= TRIM_INTERVAL_S:
                release_freed_memory()
                last_trim = time.perf_counter()
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            guard.observe(loss, step)
            last = step >= tc.max_steps
            log_now = step % tc.log_every == 0 or last
            eval_now = tc.eval_every and (step % tc.eval_every == 0 or last)
            save_now = tc.checkpoint_every and (step % tc.checkpoint_every == 0 or last)
            if log_now or eval_now or save_now:
                guard.check(last_ckpt)  # one host sync, and never a save after a non-finite loss
            if log_now:
                if t_warm is None:
                    t_warm, images_warm = time.perf_counter(), images_seen
                loss_value = loss.item()
                logs = {
                    "train/loss": loss_value,
                    "train/recon_loss": outputs.recon_loss.item(),
                    "train/commitment_loss": outputs.commitment_loss.item(),
                    "train/codebook_loss": outputs.codebook_loss.item(),
                    "train/perplexity": outputs.perplexity.item(),
                    "train/usage": outputs.usage.item(),
                    "train/dead_codes": int(outputs.dead_codes),
                    "train/lr": lr,
                    "train/images_per_s": images_seen / (time.perf_counter() - t0),
                    **{k: float(v) for k, v in extra_logs.items()},
                }
                accelerator.log(logs, step=step)
                bar.set_postfix(loss=f"{loss_value:.4f}", ppl=f"{logs['train/perplexity']:.0f}")
            if eval_now:
                val_metrics = validate(model, val_dl, accelerator, step, out, tc.eval_max_batches)
            if save_now:
                last_ckpt = save_checkpoint(accelerator, step)
            if last:
                break
        epoch += 1
    bar.close()

    accelerator.wait_for_everyone()
    wall = time.perf_counter() - t0
    # Every rank must hold the same codebook (all-reduced EMA, broadcast restarts): check, do not assume.
    embed = accelerator.unwrap_model(model).quantizer.codebook().detach()
    gathered = accelerator.gather(embed.unsqueeze(0))  # (world, K, D)
    rank_diff = (gathered - gathered[:1]).abs().max().item()
    if not val_metrics:
        val_metrics = validate(model, val_dl, accelerator, step, out, tc.eval_max_batches)
    if accelerator.is_main_process:
        repo_id = tc.hub_model_id if tc.push_to_hub else None
        save_final_model(accelerator.unwrap_model(model), out / "model", cfg, val_metrics, out, repo_id)
        if tc.push_to_hub:
            logger.info("pushed %s", upload_folder(out / "model", tc.hub_model_id))
        write_json(
            out / "train_summary.json",
            {
                "steps": step,
                "num_processes": accelerator.num_processes,
                "wall_time_s": wall,
                "images_per_s": images_seen / wall if wall > 0 else None,
                "images_per_s_after_first_log": steady_rate(t0 + wall, t_warm, images_seen - images_warm),
                "peak_accelerator_memory_gib": peak_accelerator_memory_gib(accelerator.device),
                "codebook_max_abs_diff_across_ranks": rank_diff,
                "validation": val_metrics,
            },
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"saved the VQ-VAE to {out / 'model'}")
    return out / "model"


def discriminator_backward(accelerator, d_loss, disc, disc_opt, max_grad_norm: float | None) -> None:
    """The discriminator's backward (and clipping at sync); under fp16 through its own GradScaler (`disc_opt.scaler`),
    not `accelerator.backward` and `clip_grad_norm_`, which scale and unscale with the launch's scaler."""
    d_scaler = disc_opt.scaler
    if d_scaler is None or d_scaler is accelerator.scaler:
        accelerator.backward(d_loss)
        if accelerator.sync_gradients and max_grad_norm:
            accelerator.clip_grad_norm_(disc.parameters(), max_grad_norm)
        return
    d_scaler.scale(d_loss / accelerator.gradient_accumulation_steps).backward()
    if accelerator.sync_gradients and max_grad_norm:
        d_scaler.unscale_(disc_opt.optimizer)
        torch.nn.utils.clip_grad_norm_(disc.parameters(), max_grad_norm)


def validate(model, val_dl, accelerator, step: int, out: Path, max_batches: int | None) -> dict:
    metrics = evaluate_model(model, val_dl, accelerator, max_batches=max_batches)
    accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        # Straight from the dataset: iterating a prepared loader on one rank only could hang a collective.
        images = val_dl.dataset.first_images(8).to(accelerator.device)
        with torch.no_grad():
            x = to_model_input(images)
            recon = unwrapped.decode_codes(unwrapped.encode(x))
        (out / "samples").mkdir(exist_ok=True)
        grid = save_image_grid([x, recon], out / "samples" / f"reconstructions_step_{step:08d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"val/reconstructions": grid.numpy()}, step=step, dataformats="HWC")
        logger.info("step %d validation: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def save_final_model(
    model: VQVAE, final: Path, cfg: Stage1Config, metrics: dict, run_dir: Path, repo_id: str | None = None
) -> None:
    """save_pretrained into a temp folder with the data config and a card image, then rename into place."""
    tmp = atomic_dir(final)
    recon = sorted((run_dir / "samples").glob("reconstructions_step_*.png"))
    if recon:
        shutil.copy(recon[-1], tmp / "reconstructions.png")
    card = {
        "metrics": {f"validation {k}": round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
        # A local folder's path means nothing on the Hub (and may reveal a user's file system).
        "training_data": "MNIST (built in)" if cfg.data.source == "mnist" else hub_id(cfg.data.source),
        "image": "reconstructions.png" if recon else None,
        "repo_id": repo_id,  # the card's usage snippet names the repo it is pushed to
    }
    model.data_config = to_dict(cfg.data)
    model.save_pretrained(tmp, model_card_kwargs=card)
    dump_yaml(tmp / "training_config.yaml", to_dict(cfg))
    commit_dir(tmp, final)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
