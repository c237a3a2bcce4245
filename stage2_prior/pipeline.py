"""VQGenPipeline: the VQ-VAE and its prior as one object, in diffusers' shape.

    from stage2_prior.pipeline import VQGenPipeline
    pipe = VQGenPipeline.from_pretrained("runs/mnist/pipeline")          # a folder or a Hub repo id
    images = pipe(classes=[3, 3, 7], guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images
    pipe = VQGenPipeline(VQVAE.from_pretrained(vqvae_dir), load_prior(prior_dir))   # from two folders
    pipe.save_pretrained("runs/mnist/pipeline"); pipe.push_to_hub("me/vqgen-mnist")

A pipeline folder holds `vqvae/` (VQVAE.save_pretrained + data_config.json), `prior/` (the transformers prior)
and `pipeline.json`. The prior records the VQ-VAE whose codes it learned (`config.vqgen.codes`); building a
pipeline from a VQ-VAE with another fingerprint, K or grid is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

from stage1_vqvae.model import VQVAE, imported_from
from stage2_prior.model import SamplingConfig, codes_meta_of, layout_of, load_prior
from stage2_prior.sampling import sample_codes
from vqgen.cli import VqgenError
from vqgen.files import atomic_dir, commit_dir, write_json
from vqgen.hub import resolve_folder, state_fingerprint, upload_folder
from vqgen.images import save_image_grid, unit_images

logger = logging.getLogger(__name__)

PIPELINE_FORMAT = "vqgen-pipeline/2"

PIPELINE_CARD = """---
{{ card_data }}
---

# vqgen pipeline: a VQ-VAE and a GPT-style prior over its codes

A VQ-VAE (`vqvae/`, van den Oord et al. 2017) that maps {{ image_size }}x{{ image_size }} images to {{ h }}x{{ w }}
grids of codes from a codebook of K={{ k }}, and a {{ arch }} prior over those grids (`prior/`), made with
[vqgen](https://github.com/vqgen/vqgen). {{ classes }}
{% if tokenizer %}
The VQ-VAE is a pretrained tokenizer: {{ tokenizer }}
{% endif %}
{% if image %}![samples from this pipeline, one row per class]({{ image }}){% endif %}

## Use

```bash
python sample.py --pipeline {{ repo_id }} --per_class 10 --output_dir samples/
```

```python
from stage2_prior.pipeline import VQGenPipeline
pipe = VQGenPipeline.from_pretrained("{{ repo_id }}")
images = pipe(num_images=8).images    # a list of PIL images
```
"""


@dataclass
class VQGenPipelineOutput:
    images: list[Image.Image] | torch.Tensor  # PIL images, or (B, C, H, W) in [0, 1] for output_type="pt"
    codes: torch.Tensor  # (B, h, w) int64, the sampled code grids
    classes: torch.Tensor | None  # (B,) class ids, None for unconditional samples


class VQGenPipeline:
    """A VQ-VAE and a prior over its codes. `__call__` samples code grids with the prior and decodes them.

    Args:
        vqvae: the stage-1 model.
        prior: a vqgen prior (a transformers causal LM with `config.vqgen`) trained on this VQ-VAE's codes.
        vqvae_fingerprint: the VQ-VAE's `state_fingerprint`, when the caller already has it.
    """

    def __init__(self, vqvae: VQVAE, prior, vqvae_fingerprint: str | None = None):
        self.vqvae = vqvae.eval()
        self.prior = prior.eval()
        self.layout = layout_of(prior)
        self.codes_meta = codes_meta_of(prior)
        self.vqvae_fingerprint = vqvae_fingerprint or state_fingerprint(vqvae)
        self.last_stats: dict = {}  # what the last call did: its settings, decoding and model forwards
        self.codes_meta.check_vqvae(
            vqvae.config.codebook_size, vqvae.config.grid_size, self.vqvae_fingerprint, "the VQ-VAE"
        )

    @property
    def class_names(self) -> list[str] | None:
        return self.codes_meta.class_names if self.layout.num_classes else None

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    def to(self, device) -> VQGenPipeline:
        self.vqvae.to(device)
        self.prior.to(device)
        return self

    # -- loading and saving --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder_or_repo_id: str | os.PathLike, **hub_kwargs) -> VQGenPipeline:
        """Load a pipeline folder (vqvae/, prior/, pipeline.json) or a Hub repo id holding one."""
        folder = resolve_folder(
            folder_or_repo_id, "pipeline", allow_patterns=["*.json", "*.safetensors", "*.md", "*.png"], **hub_kwargs
        )
        info_file = folder / "pipeline.json"
        if not info_file.is_file():
            raise VqgenError(
                f"{folder} has no pipeline.json; make one with python -m stage2_prior.export --vqvae ... --prior ..."
            )
        info = json.loads(info_file.read_text())
        if info.get("format") != PIPELINE_FORMAT:
            raise VqgenError(f"{info_file} is in format {info.get('format')!r}, not {PIPELINE_FORMAT!r}; re-export it")
        return cls(VQVAE.from_pretrained(folder / info["vqvae"]), load_prior(folder / info["prior"]))

    def save_pretrained(self, folder: str | os.PathLike, sample_image: bool = True) -> Path:
        """Write vqvae/, prior/, pipeline.json and a model card into `folder`, atomically.

        `sample_image` draws one seeded grid (one row per class) for the card.
        """
        folder = Path(folder)
        tmp = atomic_dir(folder)
        try:
            self.vqvae.save_pretrained(tmp / "vqvae")  # with data_config.json
            self.prior.save_pretrained(tmp / "prior")
            write_json(
                tmp / "pipeline.json",
                {
                    "format": PIPELINE_FORMAT,
                    "vqvae": "vqvae",
                    "prior": "prior",
                    "vqvae_fingerprint": self.vqvae_fingerprint,
                },
            )
            image = None
            if sample_image:
                image = "samples.png"
                self._card_grid(tmp / image)
            self.model_card(image).save(tmp / "README.md")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit_dir(tmp, folder)
        return folder

    def _card_grid(self, path: Path) -> None:
        per_row = 8
        generator = torch.Generator(device=self.device).manual_seed(0)
        if self.layout.num_classes:
            classes = torch.arange(self.layout.num_classes).repeat_interleave(per_row)
            out = self(classes=classes, generator=generator, output_type="pt")
        else:
            out = self(num_images=2 * per_row, generator=generator, output_type="pt")
        images = out.images * 2 - 1  # back to [-1, 1] for the shared grid writer
        save_image_grid(list(images.split(per_row)), path)

    def model_card(self, image: str | None = None, repo_id: str = "PATH_OR_REPO_ID") -> ModelCard:
        names = self.class_names
        return ModelCard.from_template(
            ModelCardData(
                library_name="vqgen",
                license="apache-2.0",
                pipeline_tag="unconditional-image-generation",
                tags=["vqgen", "vq-vae", "autoregressive-prior", "image-generation"],
            ),
            template_str=PIPELINE_CARD,
            image_size=self.vqvae.config.image_size,
            h=self.layout.height,
            w=self.layout.width,
            k=self.layout.codebook_size,
            arch=self.prior.config.model_type,
            classes=f"The prior is class-conditional over {names}." if names else "The prior is unconditional.",
            tokenizer=imported_from(self.vqvae.tokenizer_source) if self.vqvae.tokenizer_source else None,
            image=image,
            repo_id=repo_id,
        )

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | None = None, api=None, local_copy=None
    ) -> str:
        """save_pretrained into a temporary folder, with the card naming `repo_id`, and upload it. `local_copy`:
        where the caller saved the pipeline too (named by the error if the upload fails)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "pipeline")
            card = self.model_card("samples.png" if (folder / "samples.png").is_file() else None, repo_id=repo_id)
            card.save(folder / "README.md")
            keep = "" if local_copy is None else local_copy
            return upload_folder(folder, repo_id, private=private, token=token, api=api, local_copy=keep)

    # -- sampling --------------------------------------------------------------------------------------

    def class_ids(self, classes) -> torch.Tensor:
        """Class ids or names (as in the prior's class names) -> (n,) int64 ids."""
        if self.layout.num_classes == 0:
            raise VqgenError("this prior is unconditional: sample with num_images, not classes")
        if isinstance(classes, torch.Tensor):
            return classes.long().cpu()
        lookup = {name: i for i, name in enumerate(self.class_names or [])}
        ids = []
        for c in classes:
            if isinstance(c, str) and c in lookup:
                ids.append(lookup[c])
            elif isinstance(c, int) or (isinstance(c, str) and c.lstrip("-").isdigit()):
                ids.append(int(c))
            else:
                raise VqgenError(f"class {c!r} is not a class of this prior ({self.class_names})")
        ids = torch.tensor(ids, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.layout.num_classes):
            raise VqgenError(f"class ids must lie in [0, {self.layout.num_classes}); got {ids.tolist()}")
        return ids

    @torch.no_grad()
    def __call__(
        self,
        classes=None,
        num_images: int | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        output_type: Literal["pil", "pt"] = "pil",
        batch_size: int = 100,
        prefix_codes: torch.Tensor | None = None,
        compile: bool = False,
        decoding: str | None = None,
        progress=None,
    ) -> VQGenPipelineOutput:
        """Sample images.

        Settings left None take the prior's recommended ones (its generation_config).

        Args:
            classes: class ids or names, one per image; None samples unconditionally (the NULL class).
            num_images: how many unconditional images (default 1); with `classes`, must equal len(classes).
            guidance_scale: classifier-free guidance (1.0: none); needs `classes`.
            temperature, top_k, top_p: the sampling distribution over codes (temperature 0: greedy).
            generator: a torch.Generator on the pipeline's device, for reproducible images.
            output_type: "pil" for a list of PIL images, "pt" for a (B, C, H, W) tensor in [0, 1].
            prefix_codes: (B, L) codes kept as given (image completion from the top rows).
            compile: decode with a torch.compile'd step (same images; pays for thousands of images).
            decoding: "sequential", "jacobi" (speculative Jacobi decoding: the same distribution in fewer
                forwards), or None to pick by batch size (`sample_codes`).
        """
        settings = SamplingConfig.resolve(
            self.prior.generation_config,
            guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
        )  # fmt: skip
        if output_type not in ("pil", "pt"):
            raise VqgenError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        if classes is not None:
            classes = self.class_ids(classes)
            if num_images is not None and num_images != len(classes):
                raise VqgenError(f"num_images={num_images} but {len(classes)} classes were given")
            n = len(classes)
        else:
            n = 1 if num_images is None else num_images
            if guidance_scale not in (None, 1.0):  # a recommended default needs no warning
                logger.warning(
                    "guidance_scale=%s is ignored: unconditional samples have no class to guide", guidance_scale
                )
            settings = dataclasses.replace(settings, guidance_scale=1.0)
        if n < 1:
            raise VqgenError("num_images must be positive")
        codes = sample_codes(
            self.prior,
            n,
            classes=classes,
            settings=settings,
            generator=generator,
            batch_size=batch_size,
            progress=progress,
            prefix_codes=prefix_codes,
            compile=compile,
            decoding=decoding,
            stats=self.last_stats,
        )
        images = torch.cat([unit_images(self.vqvae.decode_codes(c)) for c in codes.split(batch_size)])
        if output_type == "pil":
            images = [to_pil(img) for img in images]
        return VQGenPipelineOutput(images=images, codes=codes.cpu(), classes=classes)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> the VQ-VAE's input (1, C, H, W) in [-1, 1], transformed as the prior's training data
        was (its codes' data_config: resize mode, channels)."""
        from stage1_vqvae.data import DataConfig, ImageTransform, to_model_input

        data = dict(self.codes_meta.data_config)
        data.update(
            resolution=self.vqvae.config.image_size, channels="L" if self.vqvae.config.in_channels == 1 else "RGB"
        )
        pixels = ImageTransform(DataConfig(**data))(image).unsqueeze(0)  # (1, C, H, W) uint8
        return to_model_input(pixels.to(self.device))

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (1, h, w) codes, preprocessed as the codes the prior learned were."""
        return self.vqvae.encode(self.preprocess(image))


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> PIL (L or RGB)."""
    arr = image.mul(255).round().byte().permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
