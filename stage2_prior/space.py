"""A Hugging Face Space for a pipeline: the folder `python -m stage2_prior.app --export_space DIR` writes.

    python -m stage2_prior.app --pipeline user/vqgen-mnist --export_space runs/space
    python -m stage2_prior.app --pipeline user/vqgen-mnist --export_space runs/space \\
        --push_to_hub --hub_space_id user/vqgen-mnist-demo

The Space is self-contained: app.py (three lines that start `stage2_prior.app` on the pipeline), the vqgen
packages this checkout runs (vqgen/, stage1_vqvae/, stage2_prior/, so the Space runs the code that made the
model), requirements.txt (vqgen's own dependencies) and a README whose front matter is the Space's metadata
(sdk gradio at the version installed here). A Hub repo id is loaded by the Space at start; a local pipeline
folder is copied into the Space as pipeline/ (push the pipeline first to keep the Space small).
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

from vqgen.cli import VqgenError
from vqgen.files import atomic_dir, commit_dir
from vqgen.hub import upload_folder

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vqgen", "stage1_vqvae", "stage2_prior")

APP = '''"""The Space's entry point: the vqgen app over {pipeline!r}.

Made by python -m stage2_prior.app --export_space; the page is stage2_prior/app.py.
"""

from stage2_prior.app import build_app, load_model, serve

demo = serve(build_app(load_model({pipeline!r})))
'''

README = """---
title: {title}
emoji: 🧩
colorFrom: indigo
colorTo: yellow
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
{models}---

# {title}

Generate, complete and inspect images with the vqgen pipeline {pipeline_link}: a VQ-VAE (van den Oord et al.
2017) and a GPT-style prior over its codes. Made with `python -m stage2_prior.app --export_space`; the same page
runs locally with `python -m stage2_prior.app --pipeline {pipeline}`.
"""


def requirements() -> list[str]:
    """vqgen's runtime dependencies (its installed metadata, else pyproject.toml) and gradio."""
    try:
        reqs = [r for r in metadata.requires("vqgen") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        import tomllib

        reqs = list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    return [*reqs, f"gradio=={gradio_version()}"]


def gradio_version() -> str:
    """The installed gradio's version, which the Space pins (read from its metadata: importing it is not needed)."""
    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        raise VqgenError(
            'a Space runs the app, which needs gradio, an optional extra: pip install "vqgen[app]" (or pip install '
            "gradio)"
        ) from None


def is_local(pipeline: str) -> bool:
    return Path(pipeline).exists()


def write_space(pipeline: str, out: Path) -> Path:
    """The Space folder for `pipeline` (a Hub repo id, or a local folder copied in), written atomically."""
    import gradio

    from stage2_prior.pipeline import VQGenPipeline

    local = is_local(pipeline)
    VQGenPipeline.from_pretrained(pipeline)  # a folder or repo that is not a pipeline stops here, before writing
    tmp = atomic_dir(out)
    try:
        for package in PACKAGES:
            shutil.copytree(ROOT / package, tmp / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        ref = "pipeline" if local else pipeline
        if local:
            shutil.copytree(pipeline, tmp / "pipeline")
        (tmp / "app.py").write_text(APP.format(pipeline=ref))
        (tmp / "requirements.txt").write_text("\n".join(requirements()) + "\n")
        name = Path(pipeline).name if local else pipeline.split("/")[-1]
        link = f"[{pipeline}](https://huggingface.co/{pipeline})" if not local else "(bundled in pipeline/)"
        (tmp / "README.md").write_text(README.format(
            title=f"vqgen {name}", gradio_version=gradio.__version__, pipeline=ref, pipeline_link=link,
            models="" if local else f"models:\n- {pipeline}\n",
        ))  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, out)
    return out


def export_space(
    pipeline: str, out: Path, overwrite: bool = False, push_to: str | None = None, private: bool = False,
    push_requested: bool = False, api=None,
) -> Path:  # fmt: skip
    """Write the Space folder (refusing to overwrite unless asked) and, with `push_to`, upload it as a Space."""
    gradio_version()  # the Space pins the installed gradio version: a missing one is the first thing said
    if push_requested and not push_to:
        raise VqgenError("--push_to_hub needs --hub_space_id owner/name")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise VqgenError(f"{out} already holds files; pass --overwrite_output_dir or choose another folder")
    write_space(pipeline, out)
    print(f"wrote a Hub Space for {pipeline} to {out} (app.py, requirements.txt, README.md)")
    if push_to:
        url = upload_folder(out, push_to, repo_type="space", private=private or None, api=api)
        print(url)
    return out
