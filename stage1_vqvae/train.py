"""Train the stage-1 VQ-VAE with Accelerate.

    python -m stage1_vqvae.train --config configs/mnist/stage1.yaml          # or --config mnist/stage1
    python -m stage1_vqvae.train --config mnist/stage1 --output_dir runs/a train.max_steps=100
    accelerate launch -m stage1_vqvae.train --config configs/cifar10/stage1.yaml train.batch_size=256
    accelerate launch --config_file configs/accelerate/ddp_bf16.yaml -m stage1_vqvae.train --config ...
    python -m stage1_vqvae.train --config configs/mnist/stage1.yaml --resume_from_checkpoint latest
    # two CPU processes (what `accelerate launch --cpu` cannot start without mpirun):
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m stage1_vqvae.train --config ...

Config keys are overridden as dotted `section.key=value` (sections: data, model, loss, train, metrics; all
listed below).
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
from tqdm.auto import tqdm

from stage1_vqvae.data import DataConfig, ImageSplit, LazyImageSplit, load_splits, to_model_input
from stage1_vqvae.evaluate import evaluate_model, reconstruction_fidelity
from stage1_vqvae.losses import LossConfig, PatchDiscriminator, VQGANLoss, check_discriminator
from stage1_vqvae.model import VQVAE, VQVAEConfig
from stage1_vqvae.sources import _cache_root
from vqgen.cli import run_cli
from vqgen.config import option, to_dict
from vqgen.files import atomic_dir, commit_dir, dump_yaml, release_freed_memory, write_json
from vqgen.hub import add_eval_results, dataset_label, hub_id, upload_folder
from vqgen.images import save_image_grid
from vqgen.metrics import standard
from vqgen.metrics.standard import MetricsConfig
from vqgen.progress import RunStats
from vqgen.training import (
    BaseTrainConfig,
    Bookkeeper,
    NonFiniteGuard,
    backward_and_step,
    build_accelerator,
    check_run,
    endless_batches,
    init_trackers,
    load_checkpoint,
    lr_at,
    open_run,
    parse_train_args,
    prepare_run,
    run_stopper,
    train_loaders,
)

logger = logging.getLogger("stage1_vqvae.train")
TRIM_INTERVAL_S = 2.0  # decoding on the fly: hand freed heap back to the OS at most this often


@dataclass
class TrainConfig(BaseTrainConfig):
    output_dir: str = "runs/stage1"
    batch_size: int = option(128, "global batch of one optimizer step (paper: 128)")
    max_steps: int = 10000
    learning_rate: float = option(2e-4, "paper: Adam 2e-4")
    min_lr_ratio: float = option(1.0, "cosine floor as a fraction of learning_rate; 1.0 = constant (the paper)")
    eval_every: int = option(1000, "0 disables periodic validation")
    checkpoint_every: int = option(1000, "0 disables checkpoints")
    channels_last: bool = option(True, "NHWC convolutions: ~1.4x faster on CPU")


@dataclass
class Stage1Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # perceptual and adversarial terms; all 0: the paper
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # rFID/LPIPS of the final model (weights files)

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


def build_model(cfg: Stage1Config) -> tuple[VQVAE, torch.optim.Optimizer]:
    """The VQ-VAE (channels-last when asked) and its Adam."""
    tc = cfg.train
    model = VQVAE(cfg.model)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    betas = (tc.adam_beta1, tc.adam_beta2)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.learning_rate, betas=betas, weight_decay=tc.weight_decay)
    return model, optimizer


def main(argv: list[str] | None = None) -> Path:
    args, cfg = parse_train_args(__doc__, Stage1Config, argv)
    check_discriminator(cfg.loss, cfg.model.image_size)
    tc, out = cfg.train, Path(cfg.train.output_dir)
    # Every rank computes the same (all-reduced) codebook, so DDP need not broadcast buffers each step.
    accelerator, per_device = build_accelerator(tc, out, [DistributedDataParallelKwargs(broadcast_buffers=False)])
    stopper = run_stopper(tc)
    resume_dir = check_run(accelerator, args, out)
    # The perceptual network's weights are found (or missing: one error) before anything is written.
    criterion = VQGANLoss(cfg.loss, accelerator.device) if cfg.loss.enabled else None
    fidelity_nets = load_fidelity_nets(cfg.metrics)  # rFID/LPIPS at the end: their files are found now, or not

    # Data. It loads before anything is written, so a failed start (a corrupt image, a missing folder, an
    # unreachable Hub) leaves no run behind and the same command works once the data is fixed.
    with accelerator.main_process_first():
        splits = load_splits(cfg.data, ("train", "validation"), accelerator.is_main_process, augment_train=True,
                             seed=tc.seed)  # fmt: skip
    open_run(accelerator, args, out, cfg, resume_dir)
    # Decoding on the fly wants workers; data already in memory does not (a worker only adds a copy).
    in_memory = all(isinstance(v, ImageSplit) for v in splits.values())
    default_workers = 0 if in_memory else LazyImageSplit.default_workers(accelerator.num_processes)
    workers = default_workers if tc.num_workers is None else tc.num_workers
    train_dl, val_dl, streaming = train_loaders(
        splits["train"], splits["validation"], accelerator, per_device, tc, workers
    )

    # Model, optimizer and (VQGAN's option) the discriminator, a model of its own with its own optimizer,
    # prepared, checkpointed and restored with the VQ-VAE; the frozen VGG stays outside.
    model, optimizer = build_model(cfg)
    gan = build_discriminator(cfg.loss, cfg.model.in_channels, tc.learning_rate)
    (model, optimizer, *gan), train_dl, val_dl = prepare_run(
        accelerator, [model, optimizer, *gan], train_dl, val_dl, streaming
    )
    stream = train_dl if streaming else None  # a stream's position is saved by every rank with each checkpoint
    if gan:
        use_own_scaler(accelerator, gan[1])
    last_layer = accelerator.unwrap_model(model).decoder.last_layer  # where the adaptive weight is measured

    # Resume, then the loop.
    step = 0
    if resume_dir is not None:
        step = load_checkpoint(accelerator, resume_dir, stream)
        logger.info("resumed from %s at step %d", resume_dir, step)
    init_trackers(accelerator, "stage1_vqvae", cfg)
    bar = tqdm(total=tc.max_steps, initial=step, desc="stage 1", disable=not accelerator.is_main_process)
    stats, guard = RunStats("images", step), NonFiniteGuard("Lower train.learning_rate or set train.max_grad_norm")
    # Decoding on the fly, glibc's heap creeps up with the number of batches (fragmentation: +0.04 GiB from 20 to
    # 40 batches at 256 px); handing the freed memory back now and then keeps the peak flat. At most every
    # TRIM_INTERVAL_S: each trim makes the next steps fault their pages in again (-22% img/s on the demo when done
    # every step). Not in memory, where the data is what sets the memory.
    last_trim = time.perf_counter() if not in_memory else None
    book, val_metrics = Bookkeeper(accelerator, tc, stopper, guard, bar, resume_dir, stream), {}
    with stopper:  # the stop signals are caught from the loop through the publish (vqgen.preemption)
        for batch in endless_batches(
            accelerator, train_dl, streaming, step, tc.gradient_accumulation_steps, tc.max_steps
        ):
            x = to_model_input(batch["images"].to(accelerator.device, non_blocking=True))
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model, *gan[:1]):
                outputs, loss, extra_logs, lr = train_step(accelerator, model, optimizer, criterion, gan, x, step, tc,
                                                           last_layer)  # fmt: skip
            stats.add(x.shape[0] * accelerator.num_processes)
            if last_trim is not None and time.perf_counter() - last_trim >= TRIM_INTERVAL_S:
                release_freed_memory()
                last_trim = time.perf_counter()
            if not accelerator.sync_gradients:
                continue
            step += 1
            plan = book.plan(step, loss)
            if plan.log:
                log_training(accelerator, bar, step, outputs, loss, lr, extra_logs, stats)
                stats.project(step, tc, accelerator.device)
            if plan.evaluate:
                val_metrics = validate(model, val_dl, accelerator, step, out, tc.eval_max_batches)
            if book.close(step, plan):
                break
        bar.close()

        # Save: the final model (with its card), the summary.
        accelerator.wait_for_everyone()
        summary = {"steps": step, "num_processes": accelerator.num_processes, **stats.summary(accelerator.device)}
        summary["codebook_max_abs_diff_across_ranks"] = codebook_rank_diff(accelerator, model)
        nets = (None, None) if stopper.signalled(accelerator) else fidelity_nets  # a stop skips rFID (minutes)
        summary["validation"] = final_figures(accelerator, model, val_dl, splits["validation"], cfg, step, val_metrics,
                                              nets)  # fmt: skip
        if accelerator.is_main_process:
            publish(accelerator.unwrap_model(model), cfg, summary)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"saved the VQ-VAE to {out / 'model'}")
    return out / "model"


def codebook_rank_diff(accelerator, model) -> float:
    """Every rank must hold the same codebook (all-reduced EMA, broadcast restarts): checked, not assumed."""
    embed = accelerator.unwrap_model(model).quantizer.codebook().detach()
    gathered = accelerator.gather(embed.unsqueeze(0))  # (world, K, D)
    return (gathered - gathered[:1]).abs().max().item()


def train_step(accelerator, model, optimizer, criterion, gan: list, x, step: int, tc: TrainConfig, last_layer):
    """One micro-batch inside `accumulate`: the VQ-VAE's loss (with the VQGAN terms when on), backward, clipping
    and step at sync; then the discriminator's own step once it has started. Returns (outputs, loss, logs, lr)."""
    with accelerator.autocast():
        outputs = model(x)
        loss, logs = outputs.loss, {}
        if criterion is not None:
            unwrapped_disc = accelerator.unwrap_model(gan[0]) if gan else None
            loss, logs = criterion.generator_loss(outputs, x, step, last_layer, unwrapped_disc)
    lr = backward_and_step(accelerator, model, optimizer, loss, step, tc)
    if criterion is not None and criterion.adversarial_on(step):
        disc, disc_opt = gan
        with accelerator.autocast():
            d_loss, d_logs = criterion.discriminator_loss(disc, x, outputs.reconstruction)
        discriminator_backward(accelerator, d_loss, disc, disc_opt, tc.max_grad_norm)
        disc_lr = criterion.cfg.disc_learning_rate or tc.learning_rate
        for group in disc_opt.param_groups:
            group["lr"] = lr_at(step, disc_lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        disc_opt.step()
        disc_opt.zero_grad(set_to_none=True)
        logs.update(d_logs)
    return outputs, loss, logs, lr


def build_discriminator(cfg: LossConfig, in_channels: int, learning_rate: float) -> list:
    """[PatchGAN, its Adam (betas 0.5, 0.9 as in VQGAN)] when the adversarial term is on, else []."""
    if cfg.adversarial_weight <= 0:
        return []
    disc = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)
    return [disc, torch.optim.Adam(disc.parameters(), lr=cfg.disc_learning_rate or learning_rate, betas=(0.5, 0.9))]


def use_own_scaler(accelerator, disc_opt) -> None:
    """fp16: the discriminator's own GradScaler. An AcceleratedOptimizer updates its scaler after every step, so
    two optimizers on the launch's one would update it twice an iteration (PyTorch's recipe updates once, after
    all have stepped); two losses over disjoint parameters may each have their own."""
    if accelerator.scaler is not None:
        disc_opt.scaler = torch.amp.GradScaler(accelerator.device.type)
        accelerator.register_for_checkpointing(disc_opt.scaler)  # before load_checkpoint, which restores it


def log_training(accelerator, bar, step: int, outputs, loss, lr: float, extra_logs: dict, stats) -> None:
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
        "train/images_per_s": stats.rate(),
        **{k: float(v) for k, v in extra_logs.items()},
    }
    accelerator.log(logs, step=step)
    bar.set_postfix(loss=f"{loss_value:.4f}", ppl=f"{logs['train/perplexity']:.0f}")


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


def final_figures(accelerator, model, val_dl, validation, cfg: Stage1Config, step: int, val_metrics: dict,
                  fidelity_nets: tuple) -> dict:  # fmt: skip
    """The final model's validation figures: the last periodic ones (or a pass now), and rFID/LPIPS when their
    networks were found at the start."""
    out, tc = Path(cfg.train.output_dir), cfg.train
    figures = dict(val_metrics or validate(model, val_dl, accelerator, step, out, tc.eval_max_batches))
    if any(net is not None for net in fidelity_nets):  # the field's figures, on the validation split
        cache = _cache_root(cfg.data)
        figures.update(reconstruction_fidelity(model, validation, val_dl, accelerator, *fidelity_nets, cache))
    return figures


def publish(model: VQVAE, cfg: Stage1Config, summary: dict) -> None:
    """Main process: the final model with its card, the summary, then the push (a failed push keeps both)."""
    tc, out = cfg.train, Path(cfg.train.output_dir)
    repo_id = tc.hub_model_id if tc.push_to_hub else None
    save_final_model(model, out / "model", cfg, summary["validation"], out, repo_id)
    write_json(out / "train_summary.json", summary)
    if tc.push_to_hub:
        logger.info("pushed %s", upload_folder(out / "model", tc.hub_model_id))


METRICS_FLAGS = {k: f"metrics.{k}" for k in ("inception_weights", "lpips_backbone", "lpips_weights")}


def load_fidelity_nets(cfg: MetricsConfig) -> tuple:
    """(Inception, LPIPS) for the final model's rFID/LPIPS, each None when off or (auto) its file is missing: said
    at INFO here, since every run on a machine without the files would otherwise start with two warnings."""
    level = logging.INFO
    return standard.load_inception(cfg, METRICS_FLAGS, level), standard.load_lpips(cfg, METRICS_FLAGS, level)


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
    dataset = dataset_label(cfg.data.source)
    add_eval_results(tmp / "README.md", final.parent.name, "image-to-image", dataset, "validation", metrics)
    dump_yaml(tmp / "training_config.yaml", to_dict(cfg))
    commit_dir(tmp, final)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
