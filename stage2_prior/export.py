"""Bundle a VQ-VAE and its prior into one pipeline folder (vqvae/, prior/, pipeline.json), optionally pushed.

    python -m stage2_prior.export --vqvae runs/mnist/stage1/model --prior runs/mnist/stage2/model \\
        --out runs/mnist/pipeline [--push_to_hub user/vqgen-mnist]

`sample.py --pipeline` loads the folder (or the Hub repo). The fingerprints are checked here, so a pipeline
never pairs a prior with a VQ-VAE whose codes it did not learn.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from stage1_vqvae.common import VqgenError, atomic_dir, commit_dir, run_cli, write_json

PIPELINE_CARD = """---
library_name: vqgen
pipeline_tag: {pipeline_tag}
tags: [vqgen, vq-vae, autoregressive-prior, image-generation]
---

# vqgen pipeline

A VQ-VAE (`vqvae/`) and a GPT-style prior over its {h}x{w} code grids (`prior/`, K={k}), made with
[vqgen](https://github.com/vqgen/vqgen). {classes}

```bash
python sample.py --pipeline THIS_REPO --per-class 10 --out samples/
```
"""


def export_pipeline(vqvae_path: str, prior_path: str, out: Path, overwrite: bool = False) -> Path:
    from stage1_vqvae.hub import resolve_folder, state_fingerprint
    from stage1_vqvae.model import VQVAE
    from stage2_prior.evaluate import load_prior
    from stage2_prior.model import check_fingerprints, layout_of

    out = Path(out)
    if out.exists() and not overwrite:
        raise VqgenError(f"{out} already exists; pass --overwrite or choose another --out")
    vqvae = VQVAE.from_pretrained(vqvae_path)
    prior = load_prior(prior_path)
    fp = state_fingerprint(vqvae)
    meta = prior.config.vqgen
    check_fingerprints(
        meta,
        {"vqvae_fingerprint": fp, "codebook_size": vqvae.config.codebook_size, "grid": [vqvae.config.grid_size] * 2},
        f"VQ-VAE {vqvae_path}",
    )
    layout = layout_of(prior)
    tmp = atomic_dir(out)
    shutil.copytree(resolve_folder(vqvae_path, "VQ-VAE"), tmp / "vqvae")
    shutil.copytree(resolve_folder(prior_path, "prior"), tmp / "prior")
    write_json(
        tmp / "pipeline.json",
        {
            "format": "vqgen-pipeline/1",
            "vqvae": "vqvae",
            "prior": "prior",
            "vqvae_fingerprint": fp,
            "codebook_size": layout.codebook_size,
            "grid": [layout.height, layout.width],
            "class_names": meta.get("class_names"),
            "image_size": vqvae.config.image_size,
            "channels": vqvae.config.in_channels,
        },
    )
    conditional = layout.num_classes > 0
    (tmp / "README.md").write_text(
        PIPELINE_CARD.format(
            pipeline_tag="unconditional-image-generation",
            h=layout.height,
            w=layout.width,
            k=layout.codebook_size,
            classes=f"Class-conditional over {meta.get('class_names')}." if conditional else "Unconditional.",
        )
    )
    commit_dir(tmp, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqvae", required=True)
    parser.add_argument("--prior", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    out = export_pipeline(args.vqvae, args.prior, Path(args.out), args.overwrite)
    if args.push_to_hub:
        from stage1_vqvae.hub import upload_folder

        print(upload_folder(out, args.push_to_hub, private=args.private or None))
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
