"""Try a pipeline in the browser: a Gradio page over `VQGenPipeline` (generate, complete, inspect).

    python -m stage2_prior.app --pipeline runs/mnist/pipeline            # http://127.0.0.1:7860
    vqgen-app --pipeline user/vqgen-mnist --port 7861
    python -m stage2_prior.app --pipeline user/vqgen-mnist --export_space runs/space \\
        [--push_to_hub --hub_space_id user/vqgen-mnist-demo]             # a Hub Space folder (stage2_prior.space)

Gradio is an optional extra (`pip install "vqgen[app]"`), imported only here and only when a page is built.

- Generate: a class (by name; hidden for unconditional pipelines), how many images, and the sampling settings,
  prefilled from the prior's generation_config (its recommended settings). The grid comes with the settings, the
  seed and the `sample.py` command that draws the same images.
- Complete: an image (uploaded or drawn) is encoded to codes, its first code rows kept and the rest sampled by the
  prior; the completions stand beside the image and its reconstruction.
- Inspect: an image's code grid as a heat map, its reconstruction, PSNR, and the prior's bits per code for it.

The work lives in `AppModel` (plain Python, tested directly); `build_app` only lays out the page.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextvars
import functools
import inspect
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stage2_prior.model import SamplingConfig, code_nll, grid_to_input_ids
from stage2_prior.pipeline import VQGenPipeline, to_pil
from vqgen.cli import VqgenError, launch_state, run_cli
from vqgen.images import unit_images

MAX_IMAGES = 64  # one sampling batch (the pipeline's batch_size is BATCH): the page never waits on more
BATCH = 100
MAX_PIXELS = 40_000_000  # a larger upload is refused before it is decoded (decompression bombs)
ANY_CLASS = "(any: unconditional)"
INSTALL = 'the app needs gradio, an optional extra: pip install "vqgen[app]" (or pip install gradio)'


def require_gradio():
    # No usage reports or version checks from the page unless the user asks for them (offline machines, tests).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise VqgenError(INSTALL) from None
    return gradio


def read_image(path: str | os.PathLike | None, what: str = "the upload") -> Image.Image:
    """An uploaded file as a PIL image, or one VqgenError that says what is wrong with it."""
    if path is None:
        raise VqgenError(f"{what}: no image given; upload one (PNG, JPEG, ...) or draw one")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise VqgenError(f"{what} is {img.width}x{img.height} pixels; images up to {MAX_PIXELS:,} are read")
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VqgenError(
            f"{what} is not an image this app can read ({type(e).__name__}); upload a PNG or JPEG"
        ) from None


def heat_map(codes: torch.Tensor, codebook_size: int, scale: int) -> Image.Image:
    """(h, w) code indices -> an RGB heat map, each cell `scale` px, index 0 dark blue to K-1 yellow."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
    t = codes.double().numpy() / max(codebook_size - 1, 1) * (len(anchors) - 1)  # (h, w) in [0, 4]
    lo = np.clip(np.floor(t).astype(int), 0, len(anchors) - 2)
    rgb = anchors[lo] + (anchors[lo + 1] - anchors[lo]) * (t - lo)[..., None]  # (h, w, 3)
    cells = np.repeat(np.repeat(rgb.round().astype(np.uint8), scale, axis=0), scale, axis=1)  # (h*s, w*s, 3)
    return Image.fromarray(cells, mode="RGB")


class AppModel:
    """A pipeline and what the page does with it, free of any UI (the tests call these directly too)."""

    def __init__(self, pipe: VQGenPipeline, source: str = "PIPELINE"):
        self.pipe = pipe
        self.source = source  # what `sample.py --pipeline` is given to reproduce a result
        self.defaults = SamplingConfig.resolve(pipe.prior.generation_config)

    @property
    def class_choices(self) -> list[str]:
        return list(self.pipe.class_names or [])

    def _generator(self, seed) -> torch.Generator:
        return torch.Generator(device=self.pipe.device).manual_seed(int(seed))

    def _class_ids(self, name: str | None, n: int) -> torch.Tensor | None:
        if not self.pipe.layout.num_classes or name in (None, "", ANY_CLASS):
            return None
        return self.pipe.class_ids([name] * n)

    def settings(self, guidance_scale, temperature, top_k, top_p) -> dict:
        """The page's fields as sampling settings. Top-k 0 and top-p 1 are "off", passed as those values: None
        would mean "the prior's recommendation" (audit 3, S4-6: top-p 1 sampled with the demo's 0.95)."""
        top_k = int(top_k) if top_k else 0
        top_p = min(1.0, float(top_p)) if top_p is not None else 1.0
        return {"guidance_scale": float(guidance_scale), "temperature": float(temperature), "top_k": top_k,
                "top_p": top_p}  # fmt: skip

    def generate(self, class_name, num_images, settings: dict, seed, decoding="sequential", progress=None):
        """(PIL images, what made them: settings, seed, decoding and the sample.py command for the same images)."""
        n = int(num_images)
        if not 1 <= n <= MAX_IMAGES:
            raise VqgenError(f"number of images must be between 1 and {MAX_IMAGES}")
        classes = self._class_ids(class_name, n)
        if classes is None:
            settings = {**settings, "guidance_scale": 1.0}  # nothing to guide towards
        out = self.pipe(classes=classes, num_images=n, generator=self._generator(seed), batch_size=BATCH,
                        decoding=decoding, progress=progress, **settings)  # fmt: skip
        used = self.pipe.last_stats.get("settings") or settings  # as resolved by the sampler: what made them
        return out.images, self.record(class_name if classes is not None else None, n, used, seed, decoding)

    def record(self, class_name, n: int, settings: dict, seed, decoding: str) -> dict:
        flags = [f"--pipeline {self.source}"]
        flags.append(f"--classes {','.join([class_name] * n)}" if class_name else f"--num_images {n}")
        flags += [f"--{k} {v}" for k, v in settings.items() if v is not None and not (k == "guidance_scale" and
                  class_name is None)]  # fmt: skip
        flags += [f"--seed {int(seed)}", f"--decoding {decoding}", f"--batch_size {BATCH}"]
        return {"class": class_name, "num_images": n, **settings, "seed": int(seed), "decoding": decoding,
                "batch_size": BATCH, "sample_py": "python sample.py " + " ".join(flags)}  # fmt: skip

    def encode(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(the model's input (1, C, H, W) in [-1, 1], its codes (1, h, w)), preprocessed as the training data."""
        h, w = self.pipe.layout.height, self.pipe.layout.width
        if image.width < w or image.height < h:
            raise VqgenError(
                f"the image is {image.width}x{image.height}; this model needs at least {w}x{h} pixels "
                f"(it makes {self.pipe.vqvae.config.image_size}x{self.pipe.vqvae.config.image_size} images)"
            )
        x = self.pipe.preprocess(image)
        return x, self.pipe.vqvae.encode(x)

    @torch.no_grad()
    def complete(self, image: Image.Image, keep_rows, num, class_name, seed, progress=None):
        """(the image as the model sees it, its reconstruction, completions, details with every code grid)."""
        h, w = self.pipe.layout.height, self.pipe.layout.width
        rows, n = int(keep_rows), int(num)
        if not 0 <= rows <= h:
            raise VqgenError(f"rows kept must be between 0 and {h} (the code grid's rows)")
        if not 1 <= n <= MAX_IMAGES:
            raise VqgenError(f"number of completions must be between 1 and {MAX_IMAGES}")
        x, codes = self.encode(image)
        prefix = codes.reshape(1, -1)[:, : rows * w].expand(n, -1)  # (n, rows * w): the kept rows, raster order
        classes = self._class_ids(class_name, n)
        out = self.pipe(classes=classes, num_images=n, prefix_codes=prefix, generator=self._generator(seed),
                        batch_size=BATCH, decoding="sequential", progress=progress)  # fmt: skip
        recon = _pil(self.pipe.vqvae.decode_codes(codes))
        details = {"keep_rows": rows, "seed": int(seed), "class": class_name if classes is not None else None,
                   "codes": codes[0].tolist(), "completion_codes": out.codes.tolist()}  # fmt: skip
        return _pil(x), recon, out.images, details

    @torch.no_grad()
    def inspect(self, image: Image.Image, class_name=None) -> tuple[Image.Image, Image.Image, Image.Image, dict]:
        """(the image as the model sees it, the code grid as a heat map, the reconstruction, {psnr_db,
        bits_per_code, codes, ...})."""
        x, codes = self.encode(image)
        recon = self.pipe.vqvae.decode_codes(codes).clamp(-1, 1)
        mse = float(((recon - x) / 2).pow(2).mean())  # on [0, 1] pixels
        classes = self._class_ids(class_name, 1)
        ids = grid_to_input_ids(codes, self.pipe.layout, classes)  # (1, 2 + h*w); NULL class when None
        nats = float(code_nll(self.pipe.prior, ids)[0])
        layout = self.pipe.layout
        details = {
            "psnr_db": 10 * math.log10(1 / max(mse, 1e-12)),
            "bits_per_code": nats / layout.num_codes / math.log(2),
            "uniform_bits_per_code": math.log2(layout.codebook_size),
            "conditioned_on": class_name if classes is not None else "nothing (the prior's unconditional NULL class)",
            "codes_used": len(codes.unique()),
            "codes": codes[0].tolist(),
        }
        scale = max(1, 256 // max(layout.height, layout.width))
        return _pil(x), heat_map(codes[0].cpu(), layout.codebook_size, scale), _pil(recon), details


def _pil(x: torch.Tensor) -> Image.Image:
    """(1, C, H, W) in [-1, 1] -> a PIL image, converted as the pipeline converts its samples."""
    return to_pil(unit_images(x)[0])


def black_canvas(size: int = 256) -> Image.Image:
    """The drawing's starting canvas: black, as the label says and as `drawn_image` composites the strokes (the
    Sketchpad's own canvas shows white)."""
    return Image.new("RGBA", (size, size), (0, 0, 0, 255))


def drawn_image(value) -> Image.Image | None:
    """A Sketchpad/ImageEditor value (dict with "composite") -> its composite on black (the pen is white), or None
    when nothing was drawn."""
    if not value or value.get("composite") is None:
        return None
    img = value["composite"]
    img = read_image(img, "the drawing") if isinstance(img, (str, os.PathLike)) else img
    if img.mode in ("RGBA", "LA"):
        base = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, img.convert("RGBA")).convert("RGB")
    if not img.getbbox():
        return None
    return img


def load_model(pipeline: str, device: str | None = None) -> AppModel:
    """The pipeline (a folder or a Hub repo id) on `device`, or on Accelerate's device."""
    if device is None:
        device = launch_state().device
    return AppModel(VQGenPipeline.from_pretrained(pipeline).to(device), source=str(pipeline))


class VisitorLeft(Exception):
    """Raised into the sampler at its next step once the visitor who asked has gone."""


def _progress(gr_progress, total: int, left=None):
    """A pipeline progress callback (codes done) that moves Gradio's progress bar; once `left` is set, it stops the
    sampling at its next step."""
    done = [0]

    def update(m: int) -> None:
        if left is not None and left.is_set():
            raise VisitorLeft
        done[0] += m
        gr_progress((min(done[0], total), total), desc="sampling codes", unit="codes")

    return update


# One long-lived sampling thread: the page serves one generation at a time, and a gone visitor's generation must
# stop before the next one runs (it does at its next step; the next job waits behind it on this thread).
SAMPLER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqgen-sampler")


def _leavable(gr, work, poll: float = 0.2):
    """Run `work(left)` on the sampling thread and yield nothing (gr.skip) every `poll` s until it returns, then
    its result.

    Gradio runs a started function to its end even when the visitor has gone, holding the one slot; but it checks
    between the yields of a generator and drops a gone visitor's generator there, which frees the slot. Closing this
    generator sets `left`, which `work` passes to the sampler's progress callback: the sampling stops at its next
    step instead of computing for nobody ahead of the next visitor's."""
    left = threading.Event()
    job = SAMPLER.submit(contextvars.copy_context().run, work, left)  # (the context carries the page's progress bar)
    try:
        while not concurrent.futures.wait([job], timeout=poll).done:
            yield gr.skip(), gr.skip()
    finally:
        left.set()
    yield job.result()  # (re-raises what the sampling raised, where Gradio shows it)


def _on_page(gr, fn):
    """`fn` with its VqgenErrors shown as a message on the page (gr.Error), without a traceback in the log."""

    @functools.wraps(fn)  # Gradio reads the signature (through __wrapped__) to find the progress argument
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VqgenError as e:
            raise gr.Error(str(e), print_exception=False) from None

    @functools.wraps(fn)
    def run_generator(*args, **kwargs):  # (Gradio serves a generator function as one, and only then)
        try:
            yield from fn(*args, **kwargs)
        except VqgenError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return run_generator if inspect.isgeneratorfunction(fn) else run


def _generate_tab(gr, model: AppModel) -> None:
    layout, d, classes = model.pipe.layout, model.defaults, model.class_choices

    def generate(
        class_name, n, guidance, temperature, top_k, top_p, seed, decoding,
        progress=gr.Progress(),  # noqa: B008 (Gradio's idiom: it fills this argument with the page's bar)
    ):  # fmt: skip
        settings = model.settings(guidance, temperature, top_k, top_p)

        def work(left):
            track = _progress(progress, int(n) * layout.num_codes, left)
            return model.generate(class_name, n, settings, seed, decoding, progress=track)

        yield from _leavable(gr, work)

    with gr.Row():
        with gr.Column(scale=1):
            first = classes[0] if classes else None
            klass = gr.Dropdown(classes, value=first, label="class", visible=bool(classes), elem_id="class")
            n = gr.Slider(1, MAX_IMAGES, value=10, step=1, label="number of images", elem_id="num_images")
            gr.Markdown("Settings prefilled from the prior's generation config (its recommended ones). "
                        "top-k 0 and top-p 1 are off.")  # fmt: skip
            guidance = gr.Number(d.guidance_scale, label="guidance scale", visible=bool(classes), minimum=0)
            temperature = gr.Number(d.temperature, label="temperature (0: greedy)", minimum=0)
            top_k = gr.Number(d.top_k or 0, label="top-k", precision=0, minimum=0)
            top_p = gr.Number(d.top_p or 1.0, label="top-p", minimum=0.01, maximum=1)
            seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
            decoding = gr.Radio(["sequential", "jacobi"], value="sequential", label="decoding",
                                info="jacobi: the same distribution in fewer model calls")  # fmt: skip
            go = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            grid = gr.Gallery(label="samples", columns=5, format="png", elem_id="grid", buttons=["download"])
            record = gr.JSON(label="what made them (run sample_py for the same images)", elem_id="record")
    inputs = [klass, n, guidance, temperature, top_k, top_p, seed, decoding]
    go.click(_on_page(gr, generate), inputs, [grid, record], api_name="generate")


def _complete_tab(gr, model: AppModel) -> None:
    layout, classes = model.pipe.layout, model.class_choices

    def complete(
        upload, drawing, keep_rows, num, class_name, seed,
        progress=gr.Progress(),  # noqa: B008
    ):  # fmt: skip
        image = read_image(upload) if upload is not None else drawn_image(drawing)
        if image is None:
            raise VqgenError("no image given: upload one or draw one")
        track = _progress(progress, int(num) * layout.num_codes)
        original, recon, completions, details = model.complete(image, keep_rows, num, class_name, seed, track)
        return [(original, "the image"), (recon, "its reconstruction")], completions, details

    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="upload an image", file_types=["image"], type="filepath")
            pen = gr.Brush(colors=["#ffffff"], default_color="#ffffff")
            drawing = gr.Sketchpad(black_canvas(), label="or draw one (white on black)", type="pil",
                                   image_mode="RGBA", canvas_size=(256, 256), brush=pen)  # fmt: skip
            rows = gr.Slider(0, layout.height, value=layout.height // 2, step=1, label="code rows kept")
            num = gr.Slider(1, 16, value=4, step=1, label="completions")
            klass = gr.Dropdown([ANY_CLASS, *classes], value=ANY_CLASS, label="class", visible=bool(classes))
            seed = gr.Number(0, label="seed", precision=0)
            go = gr.Button("Complete", variant="primary")
        with gr.Column(scale=2):
            shown = gr.Gallery(label="the image as the model sees it, and its reconstruction", columns=2, format="png")
            completions = gr.Gallery(label="completions", columns=4, format="png")
            details = gr.JSON(label="codes: the image's and each completion's")
    inputs = [upload, drawing, rows, num, klass, seed]
    go.click(_on_page(gr, complete), inputs, [shown, completions, details], api_name="complete")


def _inspect_tab(gr, model: AppModel) -> None:
    def inspect(upload, class_name):
        seen, heat, recon, details = model.inspect(read_image(upload), class_name)
        summary = (
            f"PSNR {details['psnr_db']:.2f} dB; the prior gives {details['bits_per_code']:.3f} bits per code "
            f"(uniform: {details['uniform_bits_per_code']:.1f}); {details['codes_used']} distinct codes"
        )
        return seen, heat, recon, summary, details

    classes = model.class_choices
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="upload an image", file_types=["image"], type="filepath")
            klass = gr.Dropdown([ANY_CLASS, *classes], value=ANY_CLASS, label="bits per code given",
                                visible=bool(classes))  # fmt: skip
            go = gr.Button("Inspect", variant="primary")
        with gr.Column(scale=2):
            with gr.Row():
                seen = gr.Image(label="the image as the model sees it", format="png")
                heat = gr.Image(label="code indices (dark: 0, yellow: K-1)", format="png")
                recon = gr.Image(label="reconstruction", format="png")
            summary = gr.Markdown()
            details = gr.JSON(label="details")
    go.click(_on_page(gr, inspect), [upload, klass], [seen, heat, recon, summary, details], api_name="inspect")


def build_app(model: AppModel):
    """The page: three tabs over `model`. Errors the page can explain (VqgenError) show as a message on it."""
    gr = require_gradio()
    layout, classes = model.pipe.layout, model.class_choices
    size = model.pipe.vqvae.config.image_size
    with gr.Blocks(title="vqgen") as demo:
        kind = f"{len(classes)} classes" if classes else "unconditional"
        gr.Markdown(f"# vqgen: {model.source}\n{size}x{size} images from {layout.height}x{layout.width} codes "
                    f"(K={layout.codebook_size}), {kind}.")  # fmt: skip
        with gr.Tab("Generate"):
            _generate_tab(gr, model)
        with gr.Tab("Complete"):
            _complete_tab(gr, model)
        with gr.Tab("Inspect"):
            _inspect_tab(gr, model)
    return demo


QUEUE_SIZE = 16  # visitors waiting at most (besides the one being served)


def serve(demo, queue_size: int = QUEUE_SIZE, **launch_kwargs):
    """Serve the page: one generation at a time (one model on one device) and at most `queue_size` visitors waiting.
    Past that Gradio answers at once that the queue is full ("busy") instead of letting a crowd wait without end
    (docs/benchmarks.md: the wait is what grows with the crowd); a visitor who leaves drops out of the queue."""
    demo.queue(default_concurrency_limit=1, max_size=queue_size).launch(**launch_kwargs)
    return demo


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="Gradio's temporary public link")
    parser.add_argument("--queue_size", type=int, default=QUEUE_SIZE, help="visitors waiting at most; more: busy")
    parser.add_argument("--device", default=None, help="default: Accelerate's device (cuda when available)")
    parser.add_argument("--export_space", default=None, metavar="DIR", help="write a Hub Space folder and exit")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="with --export_space")
    parser.add_argument("--push_to_hub", action="store_true", help="with --export_space: upload it as a Space")
    parser.add_argument("--hub_space_id", default=None, help="the Space repo for --push_to_hub (owner/name)")
    parser.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    if args.export_space:
        from stage2_prior.space import export_space

        return export_space(args.pipeline, Path(args.export_space), overwrite=args.overwrite_output_dir,
                            push_to=args.hub_space_id if args.push_to_hub else None, private=args.hub_private_repo,
                            push_requested=args.push_to_hub)  # fmt: skip
    if args.push_to_hub or args.hub_space_id:
        raise VqgenError("--push_to_hub and --hub_space_id go with --export_space DIR")
    if args.queue_size < 1:  # (Gradio would answer every visitor "Queue is full")
        raise VqgenError(f"--queue_size {args.queue_size}: the number of visitors who may wait must be at least 1")
    require_gradio()  # before the pipeline loads: a missing extra is the first thing said
    demo = build_app(load_model(args.pipeline, args.device))
    return serve(demo, args.queue_size, server_name=args.host, server_port=args.port, share=args.share)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
