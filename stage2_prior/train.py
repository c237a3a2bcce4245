"""Train the stage-2 prior (a transformers causal LM over code grids) with Accelerate.

    python -m stage2_prior.train --config configs/mnist/stage2.yaml
    accelerate launch -m stage2_prior.train --config configs/cifar10/stage2.yaml data.codes=user/cifar10-codes
    accelerate launch --config_file configs/accelerate/fsdp_bf16.yaml -m stage2_prior.train --config ...
    python -m stage2_prior.train --config configs/mnist/stage2.yaml --resume latest
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m stage2_prior.train --config ...   # 2 CPU processes

Reads the code dataset written by `stage1_vqvae.extract` (a local folder or a Hub dataset id). The run folder
holds config.yaml, checkpoints/step_XXXXXXXX, logs/, samples/ and model/ (save_pretrained: model.safetensors,
config.json with the token layout and fingerprints, generation_config.json, README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
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
from stage2_prior.data import CodeDataConfig, load_code_splits
from stage2_prior.model import PriorConfig, TokenLayout, build_prior, check_fingerprints, labels_for

logger = logging.getLogger("stage2_prior.train")


@dataclass
class TrainConfig:
    output_dir: str = "runs/stage2"
    seed: int = 0
    batch_size: int = 64  # global sequences per optimizer step
    gradient_accumulation_steps: int = 1
    max_steps: int = 5000
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.1  # on 2-D weights only (no biases, no norms)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    log_every: int = 50
    eval_every: int = 500
    eval_max_batches: int | None = 20
    sample_every_eval: bool = True  # decode a sample grid at each evaluation when the VQ-VAE is at hand
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    compile: bool = False
    push_to_hub: str | None = None  # Hub repo id: upload model/ when training ends (token from `hf auth login`)

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class Stage2Config:
    data: CodeDataConfig = field(default_factory=CodeDataConfig)
    model: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def apply_class_dropout(input_ids: torch.Tensor, layout: TokenLayout, p: float, generator: torch.Generator):
    """Replace the class token (position 1) by NULL with probability p (classifier-free guidance training)."""
    if layout.num_classes == 0 or p <= 0:
        return input_ids
    drop = torch.rand(input_ids.shape[0], generator=generator) < p
    out = input_ids.clone()
    out[drop.to(out.device), 1] = layout.null
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_nll(model, loader, accelerator, max_batches: int | None = None) -> dict:
    """Held-out code NLL (nats and bits per code, over the K code tokens) on the loader's sequences."""
    from stage2_prior.model import code_nll, layout_of

    was = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    layout = layout_of(unwrapped)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            nll = code_nll(unwrapped, batch["input_ids"])
        total += torch.stack([nll.double().sum(), torch.tensor(float(len(nll)), device=nll.device).double()])
    total = accelerator.reduce(total) if accelerator.num_processes > 1 else total
    model.train(was)
    per_seq = (total[0] / total[1]).item()
    return {
        "nll_nats_per_code": per_seq / layout.num_codes,
        "bits_per_code": per_seq / layout.num_codes / math.log(2),
        "uniform_bits_per_code": math.log2(layout.codebook_size),
        "num_sequences": int(total[1].item()),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    cfg: Stage2Config = load_config(Stage2Config, args.config, overrides)
    tc = cfg.train
    out = Path(tc.output_dir)

    accelerator, per_device = build_accelerator(tc, out, ())

    splits, meta, layout = load_code_splits(cfg.data, splits=("train", "validation"))
    resume_dir = resolve_resume(args.resume, out / "checkpoints") if args.resume else None
    if resume_dir is not None and (out / "codes_meta.json").is_file():
        # Resuming on codes from another VQ-VAE would silently mix two token vocabularies.
        before = json.loads((out / "codes_meta.json").read_text())
        check_fingerprints(
            {
                "layout": {
                    "codebook_size": before["codebook_size"],
                    "height": before["grid"][0],
                    "width": before["grid"][1],
                },
                "vqvae_fingerprint": before["vqvae_fingerprint"],
            },
            meta,
            f"code dataset {cfg.data.codes}",
        )
    if accelerator.is_main_process:
        prepare_output_dir(out, resume=args.resume is not None, overwrite=args.overwrite)
        dump_yaml(out / "config.yaml", to_dict(cfg))
        write_json(out / "codes_meta.json", meta)
    accelerator.wait_for_everyone()
    set_seed(tc.seed)

    vqgen_meta = {
        "class_names": meta.get("class_names") if layout.num_classes else None,
        "codes_fingerprint": meta["codes_fingerprint"],
        "code_dataset": cfg.data.codes,
        "vqvae_fingerprint": meta["vqvae_fingerprint"],
        "vqvae_location": meta.get("vqvae_location"),
        "image_size": meta.get("image_size"),
        "channels": meta.get("channels"),
    }
    model = build_prior(cfg.model, layout, vqgen_meta)
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2)
    )
    train_dl = torch.utils.data.DataLoader(splits["train"], batch_size=per_device, shuffle=True, drop_last=True)
    val_dl = torch.utils.data.DataLoader(splits["validation"], batch_size=max(per_device, 64))
    if len(train_dl) == 0:
        raise VqgenError(f"the train split has {len(splits['train'])} sequences, fewer than one batch of {per_device}")
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)

    step = 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        step = json.loads((resume_dir / STATE_FILE).read_text())["step"]
        logger.info("resumed from %s at step %d", resume_dir, step)
    init_trackers(accelerator, "stage2_prior", cfg)

    decoder = load_matching_vqvae(meta, accelerator) if tc.sample_every_eval else None
    per_epoch = len(train_dl)
    epoch, skip = divmod(step * tc.gradient_accumulation_steps, per_epoch)

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.max_steps, initial=step, desc="stage 2", disable=not accelerator.is_main_process)
    last_ckpt = resume_dir
    t0, tokens_seen = time.perf_counter(), 0
    val: dict = {}
    watch = LossWatch("Lower train.learning_rate or set train.max_grad_norm")
    micro = step * tc.gradient_accumulation_steps
    while step < tc.max_steps:
        train_dl.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        skip = 0
        for batch in loader:
            # Class dropout from a generator keyed by (seed, micro-batch, rank): identical after a resume.
            g = torch.Generator().manual_seed(tc.seed * 1_000_003 + micro * 131 + accelerator.process_index)
            micro += 1
            input_ids = apply_class_dropout(batch["input_ids"], layout, cfg.model.class_dropout, g)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = model(input_ids=input_ids, labels=labels_for(input_ids))
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and tc.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                lr = lr_at(step, tc.learning_rate, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens_seen += input_ids.shape[0] * layout.num_codes * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            # The loss is read on the host (a sync) only when something is due, never saved after a non-finite one.
            log_now, eval_now, save_now = watch.after_step(outputs.loss, step, tc, last_ckpt)
            if log_now:
                loss = outputs.loss.item()
                accelerator.log(
                    {
                        "train/loss": loss,
                        "train/bits_per_code": loss / math.log(2),
                        "train/lr": lr,
                        "train/tokens_per_s": tokens_seen / (time.perf_counter() - t0),
                    },
                    step=step,
                )
                bar.set_postfix(bits_per_code=f"{loss / math.log(2):.3f}")
            if eval_now:
                val = evaluate_nll(model, val_dl, accelerator, tc.eval_max_batches)
                accelerator.log({f"val/{k}": v for k, v in val.items()}, step=step)
                logger.info("step %d validation: %s", step, val)
                if decoder is not None and accelerator.is_main_process:
                    log_samples(accelerator, model, decoder, layout, step, out)
            if save_now:
                last_ckpt = save_checkpoint(accelerator, out / "checkpoints", step, tc.checkpoints_total_limit)
            if step >= tc.max_steps:
                break
        epoch += 1
    bar.close()
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - t0
    if not val:
        val = evaluate_nll(model, val_dl, accelerator, tc.eval_max_batches)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        save_final_prior(unwrapped, out / "model", cfg, val, out)
        if tc.push_to_hub:
            from stage1_vqvae.hub import upload_folder

            logger.info("pushed %s", upload_folder(out / "model", tc.push_to_hub))
        write_json(
            out / "train_summary.json",
            {
                "steps": step,
                "num_processes": accelerator.num_processes,
                "wall_time_s": wall,
                "tokens_per_s": tokens_seen / wall,
                "validation": val,
            },
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "model"


def load_matching_vqvae(meta: dict, accelerator):
    """The VQ-VAE that made the codes, if it is a local folder whose fingerprint matches; else None."""
    from stage1_vqvae.hub import state_fingerprint
    from stage1_vqvae.model import VQVAE

    loc = meta.get("vqvae_location")
    if not loc or not Path(loc).is_dir():
        return None
    try:
        vqvae = VQVAE.from_pretrained(loc).to(accelerator.device)
    except VqgenError:
        return None
    return vqvae if state_fingerprint(vqvae) == meta["vqvae_fingerprint"] else None


def log_samples(accelerator, model, vqvae, layout: TokenLayout, step: int, out: Path) -> None:
    from torchvision.utils import make_grid, save_image

    from stage2_prior.model import sample_codes

    unwrapped = accelerator.unwrap_model(model)
    n = 8 if layout.num_classes == 0 else layout.num_classes
    classes = None if layout.num_classes == 0 else torch.arange(n)
    g = torch.Generator(device=accelerator.device).manual_seed(0)
    codes = sample_codes(unwrapped, n, classes=classes, generator=g)
    images = vqvae.decode_codes(codes).float().clamp(-1, 1).add(1).div(2).cpu()  # (n, C, H, W)
    grid = make_grid(images, nrow=n, padding=2)
    (out / "samples").mkdir(exist_ok=True)
    save_image(grid, out / "samples" / f"samples_step_{step:08d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images(
                {"val/samples": (grid * 255).byte().permute(1, 2, 0).numpy()}, step=step, dataformats="HWC"
            )


PRIOR_CARD = """---
library_name: transformers
pipeline_tag: unconditional-image-generation
tags: [vqgen, vq-vae, image-generation, autoregressive-prior]
{datasets}---

# vqgen prior over VQ-VAE codes

A {arch} causal LM trained with [vqgen](https://github.com/vqgen/vqgen) on the code grids of `{dataset}`:
{h}x{w} codes from a codebook of K={k}, {classes}.

- VQ-VAE it belongs to: `{vqvae}` (fingerprint `{vqvae_fp}`)
- held-out bits per code: {bpc} (uniform prior: {uniform})

Sample with `python sample.py --vqvae VQVAE --prior THIS_REPO`.
"""


def save_final_prior(model, final: Path, cfg: Stage2Config, val: dict, run_dir: Path) -> None:
    """save_pretrained (safetensors, config.json, generation_config.json) + card, atomically."""
    meta = model.config.vqgen
    tmp = atomic_dir(final)
    model.save_pretrained(tmp)
    lay = meta["layout"]
    dataset = meta.get("code_dataset") or ""
    card = PRIOR_CARD.format(
        arch=cfg.model.arch,
        dataset=dataset,
        h=lay["height"],
        w=lay["width"],
        k=lay["codebook_size"],
        classes=f"conditioned on {lay['num_classes']} classes" if lay["num_classes"] else "unconditional",
        vqvae=meta.get("vqvae_location"),
        vqvae_fp=meta.get("vqvae_fingerprint"),
        bpc=round(val.get("bits_per_code", float("nan")), 4),
        uniform=round(math.log2(lay["codebook_size"]), 4),
        datasets=f"datasets: [{dataset}]\n" if "/" in dataset and not Path(dataset).exists() else "",
    )
    samples = sorted((run_dir / "samples").glob("samples_step_*.png"))
    if samples:
        shutil.copy(samples[-1], tmp / "samples.png")
        card += "\n![samples](samples.png)\n"
    (tmp / "README.md").write_text(card)
    dump_yaml(tmp / "training_config.yaml", to_dict(cfg))
    commit_dir(tmp, final)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
