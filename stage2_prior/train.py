"""Train the stage-2 prior (a transformers causal LM over code grids) with Accelerate.

    python -m stage2_prior.train --config configs/mnist/stage2.yaml          # or --config mnist/stage2
    accelerate launch -m stage2_prior.train --config configs/cifar10/stage2.yaml data.codes=user/cifar10-codes
    accelerate launch --config_file configs/accelerate/fsdp_bf16.yaml -m stage2_prior.train --config ...
    python -m stage2_prior.train --config configs/mnist/stage2.yaml --resume_from_checkpoint latest
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m stage2_prior.train --config ...   # 2 CPU processes

Reads the code dataset written by `stage1_vqvae.extract` (a local folder or a Hub dataset id). Config keys are
overridden as dotted `section.key=value` (sections: data, model, train, sampling; all listed below). The run
folder holds config.yaml, codes_meta.json, checkpoints/checkpoint_<step>, logs/, samples/ and model/ (save_pretrained:
model.safetensors, config.json with the token layout and the codes' contract, generation_config.json, README.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from tqdm.auto import tqdm

from stage1_vqvae.model import VQVAE
from stage2_prior.data import CodeDataConfig, load_code_splits
from stage2_prior.model import PriorConfig, SamplingConfig, TokenLayout, build_prior, code_nll, labels_for, layout_of
from stage2_prior.sampling import sample_codes
from vqgen.cli import VqgenError, run_cli
from vqgen.codes import CodesMeta
from vqgen.config import option, to_dict
from vqgen.files import atomic_dir, commit_dir, dump_yaml, write_json
from vqgen.hub import hub_id, state_fingerprint, upload_folder
from vqgen.images import save_image_grid
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
    open_run,
    parse_train_args,
    prepare_run,
    run_stopper,
    train_loaders,
)

# GPT-2 and Llama priors tie lm_head to the token embedding: accelerate's save_state drops the duplicate and warns
# at every checkpoint. The tie is the model's own and is restored at load (resume is tested bit for bit), so that
# one message is filtered out of accelerate's log.
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())
logger = logging.getLogger("stage2_prior.train")


@dataclass
class TrainConfig(BaseTrainConfig):
    output_dir: str = "runs/stage2"
    batch_size: int = option(64, "global sequences of one optimizer step")
    max_steps: int = 5000
    adam_beta2: float = 0.95
    weight_decay: float = option(0.1, "on 2-D weights only (no biases, no norms)")
    warmup_steps: int = 100
    max_grad_norm: float | None = 1.0
    sample_every_eval: bool = option(True, "decode a sample grid at each evaluation when the VQ-VAE is at hand")


@dataclass
class Stage2Config:
    data: CodeDataConfig = field(default_factory=CodeDataConfig)
    model: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


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
    was = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    layout = layout_of(unwrapped)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # sum of NLLs, sequences
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            nll = code_nll(unwrapped, batch["input_ids"]).double()  # (B,)
        nll = accelerator.gather_for_metrics(nll)  # each sequence once: the padding of the last batch is dropped
        total += torch.stack([nll.sum(), torch.tensor(float(len(nll)), dtype=torch.float64, device=nll.device)])
    model.train(was)
    per_seq = (total[0] / total[1]).item()
    return {
        "nll_nats_per_code": per_seq / layout.num_codes,
        "bits_per_code": per_seq / layout.num_codes / math.log(2),
        "uniform_bits_per_code": math.log2(layout.codebook_size),
        "num_sequences": int(total[1].item()),
    }


def main(argv: list[str] | None = None) -> Path:
    args, cfg = parse_train_args(__doc__, Stage2Config, argv)
    tc, out = cfg.train, Path(cfg.train.output_dir)
    accelerator, per_device = build_accelerator(tc, out, ())
    stopper = run_stopper(tc)
    resume_dir = check_run(accelerator, args, out)

    # Data. It loads before anything is written (see stage 1).
    splits, meta, layout = load_code_splits(cfg.data, splits=("train", "validation"), seed=tc.seed)
    if resume_dir is not None and (out / "codes_meta.json").is_file():
        # Resuming on codes from another VQ-VAE would silently mix two token vocabularies.
        before = CodesMeta.from_json_dict(json.loads((out / "codes_meta.json").read_text()), "codes_meta.json")
        before.check_same_vqvae(meta, f"code dataset {cfg.data.codes}")
    open_run(accelerator, args, out, cfg, resume_dir, {"codes_meta.json": dataclasses.asdict(meta)})
    train_dl, val_dl, streaming = train_loaders(
        splits["train"], splits["validation"], accelerator, per_device, tc, tc.num_workers or 0
    )

    # Model and optimizer.
    model = build_prior(cfg.model, layout, meta, cfg.data.codes, cfg.sampling)
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2)
    )
    (model, optimizer), train_dl, val_dl = prepare_run(accelerator, [model, optimizer], train_dl, val_dl, streaming)
    stream = train_dl if streaming else None  # a stream's position is saved by every rank with each checkpoint
    # Before the checkpoint restores the RNG: building the VQ-VAE draws from it, which after the restore would
    # shift every later draw (dropout) away from the uninterrupted run's.
    vqvae = load_matching_vqvae(meta, accelerator) if tc.sample_every_eval else None

    # Resume, then the loop.
    step = 0
    if resume_dir is not None:
        step = load_checkpoint(accelerator, resume_dir, stream)
        logger.info("resumed from %s at step %d", resume_dir, step)
    init_trackers(accelerator, "stage2_prior", cfg)
    bar = tqdm(total=tc.max_steps, initial=step, desc="stage 2", disable=not accelerator.is_main_process)
    stats, guard = RunStats("tokens", step), NonFiniteGuard("Lower train.learning_rate or set train.max_grad_norm")
    book, val = Bookkeeper(accelerator, tc, stopper, guard, bar, resume_dir, stream), {}
    micro = step * tc.gradient_accumulation_steps
    with stopper:  # the stop signals are caught from the loop through the publish (vqgen.preemption)
        for batch in endless_batches(
            accelerator, train_dl, streaming, step, tc.gradient_accumulation_steps, tc.max_steps
        ):
            # Class dropout from a generator keyed by (seed, micro-batch, rank): identical after a resume.
            g = torch.Generator().manual_seed(tc.seed * 1_000_003 + micro * 131 + accelerator.process_index)
            micro += 1
            input_ids = batch["input_ids"].to(accelerator.device, non_blocking=True)
            input_ids = apply_class_dropout(input_ids, layout, cfg.model.class_dropout, g)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = model(input_ids=input_ids, labels=labels_for(input_ids))
                lr = backward_and_step(accelerator, model, optimizer, outputs.loss, step, tc)
            stats.add(input_ids.shape[0] * layout.num_codes * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            step += 1
            plan = book.plan(step, outputs.loss)
            if plan.log:
                loss = outputs.loss.item()
                accelerator.log({"train/loss": loss, "train/bits_per_code": loss / math.log(2), "train/lr": lr,
                                 "train/tokens_per_s": stats.rate()}, step=step)  # fmt: skip
                bar.set_postfix(bits_per_code=f"{loss / math.log(2):.3f}")
                stats.project(step, tc, accelerator.device)
            if plan.evaluate:
                val = evaluate_nll(model, val_dl, accelerator, tc.eval_max_batches)
                accelerator.log({f"val/{k}": v for k, v in val.items()}, step=step)
                logger.info("step %d validation: %s", step, val)
                if vqvae is not None:
                    log_samples(accelerator, model, vqvae, layout, step, out)
            if book.close(step, plan):
                break
        bar.close()

        # Save: the final prior (with its card), the summary.
        accelerator.wait_for_everyone()
        summary = {"steps": step, "num_processes": accelerator.num_processes, **stats.summary(accelerator.device)}
        summary["validation"] = val or evaluate_nll(model, val_dl, accelerator, tc.eval_max_batches)
        # Every rank joins: under FSDP the full state dict is gathered from the shards (unwrap_model alone would
        # leave a sharded model that cannot be saved from one rank).
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            publish(accelerator.unwrap_model(model, keep_torch_compile=False), state_dict, cfg, summary)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"saved the prior to {out / 'model'}")
    return out / "model"


def load_matching_vqvae(meta: CodesMeta, accelerator) -> VQVAE | None:
    """The VQ-VAE that made the codes, if it is a local folder whose fingerprint matches; else None."""
    loc = meta.vqvae_location
    if not loc or not Path(loc).is_dir():
        return None
    try:
        vqvae = VQVAE.from_pretrained(loc)
    except VqgenError:
        return None
    return vqvae.to(accelerator.device) if state_fingerprint(vqvae) == meta.vqvae_fingerprint else None


def log_samples(accelerator, model, vqvae: VQVAE, layout: TokenLayout, step: int, out: Path) -> None:
    """One seeded grid of samples. Every rank samples (under FSDP a forward gathers the shards, so a forward
    on one rank alone would hang); the main process writes the image."""
    unwrapped = accelerator.unwrap_model(model)
    n = 8 if layout.num_classes == 0 else layout.num_classes
    classes = None if layout.num_classes == 0 else torch.arange(n)
    g = torch.Generator(device=accelerator.device).manual_seed(0)
    codes = sample_codes(unwrapped, n, classes=classes, generator=g)
    if accelerator.is_main_process:
        (out / "samples").mkdir(exist_ok=True)
        grid = save_image_grid([vqvae.decode_codes(codes)], out / "samples" / f"samples_step_{step:08d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"val/samples": grid.numpy()}, step=step, dataformats="HWC")


PRIOR_CARD = """---
{{ card_data }}
---

# vqgen prior over VQ-VAE codes

A {{ arch }} causal LM trained with [vqgen](https://github.com/vqgen/vqgen) on {{ h }}x{{ w }} code grids from a
codebook of K={{ k }} made by the VQ-VAE with fingerprint `{{ vqvae_fp }}`; {{ classes }}.
{% if source %}The images came from `{{ source }}`.{% endif %}

- held-out bits per code: {{ bpc }} (a uniform prior: {{ uniform }})

{% if image %}![samples]({{ image }}){% endif %}

## Use

{% if repo_id and vqvae_repo %}```bash
python -m stage2_prior.export --vqvae {{ vqvae_repo }} --prior {{ repo_id }} --output_dir pipeline
python sample.py --pipeline pipeline --num_images 16
```
{% else %}Bundle it with the VQ-VAE that made its codes (the fingerprint above) into a pipeline with
`python -m stage2_prior.export`, which checks that the two belong together, then sample with
`python sample.py --pipeline` or `VQGenPipeline.from_pretrained`.
{% endif %}"""


def publish(model, state_dict: dict, cfg: Stage2Config, summary: dict) -> None:
    """Main process: the final prior with its card, the summary, then the push (a failed push keeps both)."""
    tc, out = cfg.train, Path(cfg.train.output_dir)
    repo_id = tc.hub_model_id if tc.push_to_hub else None
    save_final_prior(model, state_dict, out / "model", cfg, summary["validation"], out, repo_id)
    write_json(out / "train_summary.json", summary)
    if tc.push_to_hub:
        logger.info("pushed %s", upload_folder(out / "model", tc.hub_model_id))


def without_tied_copies(model, state_dict: dict) -> dict:
    """The state dict without the tied output embedding. save_pretrained drops a tied tensor when it shares storage
    with its source, but FSDP gathers the two as separate copies, which it would write as a second tensor."""
    out = dict(state_dict)
    for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if tied in out and source in out:
            if not torch.equal(out[tied], out[source]):
                raise RuntimeError(f"{tied} no longer equals {source}, which it is tied to: the tie broke in training")
            del out[tied]
    return out


def save_final_prior(
    model, state_dict: dict, final: Path, cfg: Stage2Config, val: dict, run_dir: Path, repo_id: str | None = None
) -> None:
    """save_pretrained (safetensors, config.json, generation_config.json) + card, atomically."""
    layout, codes = layout_of(model), CodesMeta.from_json_dict(model.config.vqgen["codes"], "config.vqgen.codes")
    tmp = atomic_dir(final)
    model.save_pretrained(tmp, state_dict=without_tied_copies(model, state_dict))
    samples = sorted((run_dir / "samples").glob("samples_step_*.png"))
    if samples:
        shutil.copy(samples[-1], tmp / "samples.png")
    on_hub = hub_id(codes.source) is not None  # a Hub dataset id, not a local path
    card = ModelCard.from_template(
        ModelCardData(
            library_name="transformers",
            license="apache-2.0",
            pipeline_tag="unconditional-image-generation",
            tags=["vqgen", "vq-vae", "image-generation", "autoregressive-prior"],
            datasets=[codes.source] if on_hub else None,
        ),
        template_str=PRIOR_CARD,
        arch=cfg.model.arch,
        h=layout.height,
        w=layout.width,
        k=layout.codebook_size,
        vqvae_fp=codes.vqvae_fingerprint[:16],
        classes=f"conditioned on {layout.num_classes} classes" if layout.num_classes else "unconditional",
        source=codes.source if on_hub or codes.source == "mnist" else None,
        bpc=round(val.get("bits_per_code", float("nan")), 4),
        uniform=round(math.log2(layout.codebook_size), 4),
        image="samples.png" if samples else None,
        repo_id=repo_id,
        vqvae_repo=hub_id(codes.vqvae_location),
    )
    card.save(tmp / "README.md")
    dump_yaml(tmp / "training_config.yaml", to_dict(cfg))
    commit_dir(tmp, final)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
