"""Bundle a VQ-VAE and its prior into one pipeline folder (vqvae/, prior/, pipeline.json, card), optionally pushed.

    python -m stage2_prior.export --vqvae runs/mnist/stage1/model --prior runs/mnist/stage2/model \\
        --output_dir runs/mnist/pipeline [--push_to_hub --hub_model_id user/vqgen-mnist]

A thin CLI over `VQGenPipeline`: building it checks that the prior learned this VQ-VAE's codes, and
`save_pretrained` writes the folder that `sample.py --pipeline` and `VQGenPipeline.from_pretrained` load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stage1_vqvae.model import VQVAE
from stage2_prior.model import load_prior
from stage2_prior.pipeline import VQGenPipeline
from vqgen.cli import VqgenError, launch_state, refuse_existing, run_cli


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqvae", required=True, help="VQ-VAE folder or Hub repo id")
    parser.add_argument("--prior", required=True, help="prior folder or Hub repo id")
    parser.add_argument("--output_dir", required=True, help="the pipeline folder to write")
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="the Hub repo for --push_to_hub (owner/name)")
    parser.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise VqgenError("--push_to_hub needs --hub_model_id owner/name")
    # Under a launcher every rank checks and builds (the same errors everywhere), then the main process alone
    # writes: two ranks saving one folder raced (3 of 50 torchrun runs failed with "already exists").
    state = launch_state()
    out = Path(args.output_dir)
    refuse_existing(out, args.overwrite_output_dir)
    pipe = VQGenPipeline(VQVAE.from_pretrained(args.vqvae), load_prior(args.prior))
    state.wait_for_everyone()  # every rank has checked the folder before it is written
    if state.is_main_process:
        pipe.save_pretrained(out)
        print(f"saved the pipeline (VQ-VAE + prior, {pipe.layout.num_classes} classes) to {out}")
        if args.push_to_hub:
            print(pipe.push_to_hub(args.hub_model_id, private=args.hub_private_repo or None, local_copy=out))
    state.wait_for_everyone()
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
