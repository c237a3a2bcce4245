"""stage2_prior.app against a live server on localhost, through gradio_client (a real HTTP client), and the Space
export: generate reproduces VQGenPipeline and sample.py, completion keeps the kept rows, bad uploads get the
page's message, a missing gradio is one line, a Space folder runs and pushes (offline, to the fake Hub)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vqgen.cli import VqgenError

from helpers import free_port, train2

gradio = pytest.importorskip("gradio", reason="the app's tests need the dev extra (gradio)")


@pytest.fixture(scope="module")
def live(pipeline_dir):
    """(the app's model, a gradio_client.Client of the page served on a free localhost port, its URL)."""
    from gradio_client import Client

    from stage2_prior.app import build_app, load_model, serve

    model = load_model(str(pipeline_dir), "cpu")
    demo = build_app(model)
    port = free_port()
    serve(demo, prevent_thread_lock=True, server_port=port, quiet=True)
    try:
        yield model, Client(f"http://127.0.0.1:{port}/", verbose=False), f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_over_http_draws_the_pipelines_images_and_says_how_to_redraw_them(live, tmp_path):
    from sample import main as sample

    model, client, _ = live
    images, record = client.predict("b", 3, 2.0, 0.9, 5, 0.95, 7, "sequential", api_name="/generate")
    assert len(images) == 3
    reference = model.pipe(classes=["b"] * 3, guidance_scale=2.0, temperature=0.9, top_k=5, top_p=0.95,
                           generator=torch.Generator().manual_seed(7), decoding="sequential")  # fmt: skip
    for got, want in zip(images, reference.images):
        assert np.array_equal(pixels(got["image"]), np.asarray(want))  # PNG over HTTP: the same pixels
    assert record["seed"] == 7 and record["top_k"] == 5 and record["class"] == "b"
    # The recorded command draws the same images with sample.py.
    argv = record["sample_py"].split()[2:] + ["--output_dir", str(tmp_path / "s"), "--device", "cpu"]
    out = sample(argv)
    files = json.loads((out / "samples.json").read_text())["files"]
    for name, want in zip(files, reference.images):
        assert np.array_equal(np.asarray(Image.open(out / name).convert(want.mode)), np.asarray(want))
    # The page's defaults are the prior's recommended settings; 0 and 1 switch top-k and top-p off.
    assert model.settings(1.0, 1.0, 0, 1.0) == {"guidance_scale": 1.0, "temperature": 1.0, "top_k": 0,
                                                "top_p": 1.0}  # fmt: skip


def test_top_k_0_and_top_p_1_switch_a_recommended_filter_off_and_the_record_says_what_was_used(stage1, tmp_path):
    # Audit 3, S4-6: 0 and 1 became None, which means "the prior's recommendation" (top-p 0.95 on the demo), while
    # the record said null.
    from sample import main as sample
    from stage1_vqvae.model import VQVAE
    from stage2_prior.app import AppModel
    from stage2_prior.model import SamplingConfig, load_prior
    from stage2_prior.pipeline import VQGenPipeline

    _, vqvae_dir, codes = stage1
    prior = load_prior(train2(tmp_path / "s2", codes, "train.max_steps=2", "train.checkpoint_every=0"))
    prior.generation_config.top_p, prior.generation_config.top_k = 0.3, 2  # a strong recommendation
    pipe = VQGenPipeline(VQVAE.from_pretrained(vqvae_dir), prior)
    folder = pipe.save_pretrained(tmp_path / "pipeline")
    assert SamplingConfig.resolve(load_prior(folder / "prior").generation_config).top_p == 0.3
    model = AppModel(pipe, source=str(folder))
    images, record = model.generate("b", 6, model.settings(1.0, 1.0, 0, 1.0), seed=3)
    off = pipe(classes=["b"] * 6, top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(3), batch_size=100)
    filtered = pipe(classes=["b"] * 6, generator=torch.Generator().manual_seed(3), batch_size=100)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, off.images))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, filtered.images))
    assert record["top_k"] == 0 and record["top_p"] == 1.0  # the settings used, not null
    assert "--top_k 0" in record["sample_py"] and "--top_p 1.0" in record["sample_py"]
    argv = record["sample_py"].split()[2:] + ["--output_dir", str(tmp_path / "s"), "--device", "cpu"]
    out = sample(argv)  # sample.py takes --top_k 0 (it refused it: "must be positive") and draws the same images
    files = json.loads((out / "samples.json").read_text())["files"]
    for name, want in zip(files, images):
        assert np.array_equal(np.asarray(Image.open(out / name).convert(want.mode)), np.asarray(want))


def test_completion_over_http_keeps_the_kept_rows_codes(live, image_folder, tmp_path):
    model, client, _ = live
    from gradio_client import handle_file

    source = next(p for p in sorted(image_folder.rglob("*.png")))
    shown, completions, details = client.predict(handle_file(str(source)), None, 2, 3, "a", 11, api_name="/complete")
    assert len(completions) == 3 and len(shown) == 2  # the image as seen and its reconstruction
    own = model.pipe.encode_image(Image.open(source))[0]  # (h, w)
    assert details["codes"] == own.tolist()
    grids = torch.tensor(details["completion_codes"])  # (3, h, w)
    assert torch.equal(grids[:, :2], own[:2].expand(3, -1, -1))  # the kept rows, exactly
    assert not torch.equal(grids[:, 2:], own[2:].expand(3, -1, -1))  # the rest was sampled (3 draws, K=16)
    # Zero rows kept: every row sampled; all rows kept: the image's own grid back.
    _, _, whole = client.predict(handle_file(str(source)), None, 4, 1, "(any: unconditional)", 0,
                                 api_name="/complete")  # fmt: skip
    assert whole["completion_codes"][0] == own.tolist()


def test_bad_uploads_get_the_pages_message(live, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client, _ = live
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError, match="not an image this app can read"):
        client.predict(handle_file(str(tmp_path / "notes.png")), "(any: unconditional)", api_name="/inspect")
    Image.new("L", (2, 2)).save(tmp_path / "tiny.png")
    with pytest.raises(AppError, match="needs at least 4x4 pixels"):
        client.predict(handle_file(str(tmp_path / "tiny.png")), None, 2, 1, "a", 0, api_name="/complete")
    with pytest.raises(AppError, match="no image given"):
        client.predict(None, None, 2, 1, "a", 0, api_name="/complete")
    with pytest.raises(AppError, match="greater than maximum value 64"):  # the page bounds the slider
        client.predict("a", 65, 1.0, 1.0, 0, 1.0, 0, "sequential", api_name="/generate")


def test_inspect_reports_the_reconstruction_and_the_priors_bits_per_code(live, image_folder):
    from gradio_client import handle_file

    from stage2_prior.model import grid_to_input_ids

    model, client, _ = live
    source = sorted(image_folder.rglob("*.png"))[3]
    seen, heat, recon, summary, details = client.predict(handle_file(str(source)), "b", api_name="/inspect")
    x = pixels(seen).astype(np.float64) / 255
    y = pixels(recon).astype(np.float64) / 255
    assert details["psnr_db"] == pytest.approx(10 * math.log10(1 / np.mean((x - y) ** 2)), abs=0.3)  # uint8 PNGs
    # Bits per code by brute force: the prior's next-token distribution at every position, one position at a time.
    codes = torch.tensor(details["codes"])[None]  # (1, h, w)
    ids = grid_to_input_ids(codes, model.pipe.layout, torch.tensor([1]))  # conditioned on "b"
    k, nats = model.pipe.layout.codebook_size, 0.0
    with torch.no_grad():
        for t in range(2, ids.shape[1]):
            logits = model.pipe.prior(input_ids=ids[:, :t]).logits[0, -1, :k]
            nats -= torch.log_softmax(logits.double(), -1)[ids[0, t]].item()
    assert details["bits_per_code"] == pytest.approx(nats / codes.numel() / math.log(2), rel=1e-4)
    assert pixels(heat).shape[:2] == (64 * codes.shape[1], 64 * codes.shape[2])  # 4x4 codes, 64 px a cell
    assert f"{details['psnr_db']:.2f} dB" in summary


def test_a_missing_gradio_is_one_line_that_says_how_to_install_it(monkeypatch, pipeline_dir, capsys):
    from stage2_prior.app import cli

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(SystemExit) as exit_:
        cli(["--pipeline", str(pipeline_dir)])
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip()
    assert 'pip install "vqgen[app]"' in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_space_folder_for_a_local_pipeline_and_its_push(pipeline_dir, tmp_path, fake_hub):
    from stage2_prior.space import export_space

    out = export_space(str(pipeline_dir), tmp_path / "space", push_to="me/demo", api=fake_hub())
    names = {p.name for p in out.iterdir()}
    assert {"app.py", "requirements.txt", "README.md", "pipeline", "vqgen", "stage1_vqvae", "stage2_prior"} <= names
    front = (out / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and f"sdk_version: {gradio.__version__}" in front and "app_file: app.py" in front
    reqs = (out / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("torch") for r in reqs) and f"gradio=={gradio.__version__}" in reqs
    remote = tmp_path / "remote" / "space" / "me" / "demo"
    assert (remote / "app.py").read_text() == (out / "app.py").read_text()
    with pytest.raises(VqgenError, match="already holds files"):
        export_space(str(pipeline_dir), out)
    # Offline: one line naming the complete local folder; the folder stays whole.
    api = fake_hub()

    def down(*a, **kw):
        raise ConnectionError("Name or service not known")

    api.create_repo = down
    with pytest.raises(
        VqgenError, match=r"space repo me/demo \(ConnectionError.*hf upload me/demo .*--repo-type space"
    ):
        export_space(str(pipeline_dir), tmp_path / "space2", push_to="me/demo", api=api)
    assert (tmp_path / "space2" / "app.py").is_file()
    # A folder that is not a pipeline stops before anything is written.
    with pytest.raises(VqgenError, match="pipeline.json"):
        export_space(str(tmp_path / "space"), tmp_path / "space3")
    assert not (tmp_path / "space3").exists()


@pytest.mark.slow  # a subprocess importing gradio and torch: seconds
def test_the_exported_space_builds_its_page_from_its_own_files(pipeline_dir, tmp_path):
    from stage2_prior.space import export_space

    out = export_space(str(pipeline_dir), tmp_path / "space")
    # The Space's own app.py, serving through the app's bounded queue, with serving replaced by a check: its copied
    # packages and bundled pipeline load.
    script = (out / "app.py").read_text()
    assert "demo = serve(build_app(" in script
    script = script.replace("demo = serve(build_app(", "demo = (build_app(") + "\ndemo.config and print('built')\n"
    script += "\nimport stage2_prior, vqgen\nprint(stage2_prior.__file__, vqgen.__file__)\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(out)},
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    built, files = proc.stdout.strip().splitlines()[-2:]
    assert built == "built" and all(f.startswith(str(out)) for f in files.split())  # the Space's copies, not ours


@pytest.mark.browser
def test_the_page_in_headless_chromium_generates_the_grid_for_a_class_and_seed(live, tmp_path):
    from benchmarks.app import browser_generate, browser_paths

    if browser_paths() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs chromium and chromium-driver")
        pytest.skip("no system Chromium and chromedriver (apt-get install chromium chromium-driver)")
    _, _, url = live
    shown = browser_generate(url, "b", 5, screenshot=tmp_path / "page.png")
    assert shown["images"] == 10  # the page's default count, all loaded
    assert '"class":"b"' in shown["record"] and '"seed":5,' in shown["record"]
    with Image.open(tmp_path / "page.png") as shot:
        assert shot.size[0] >= 1000 and len(shot.getcolors(1 << 20) or range(1000)) > 50  # a rendered page


def test_a_drawing_is_its_strokes_on_black_and_an_empty_canvas_is_no_image():
    from stage2_prior.app import black_canvas, drawn_image

    canvas = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # the Sketchpad's transparent canvas
    assert drawn_image({"background": None, "layers": [], "composite": canvas}) is None
    # The page starts it black (the label says "white on black"; the bare Sketchpad shows white): still no image.
    assert np.asarray(black_canvas()).max(axis=(0, 1)).tolist() == [0, 0, 0, 255]
    assert drawn_image({"background": black_canvas(), "layers": [], "composite": black_canvas()}) is None
    assert drawn_image(None) is None
    canvas.paste((255, 255, 255, 255), (8, 8, 24, 12))  # one white stroke
    img = drawn_image({"composite": canvas})
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr[10, 10].tolist() == [255, 255, 255] and arr[0, 0].tolist() == [0, 0, 0]


def test_the_cli_refuses_push_flags_without_a_space_folder(pipeline_dir):
    from stage2_prior.app import main

    with pytest.raises(VqgenError, match="go with --export_space"):
        main(["--pipeline", str(pipeline_dir), "--push_to_hub", "--hub_space_id", "me/x"])
    with pytest.raises(VqgenError, match="needs --hub_space_id"):
        main(["--pipeline", str(pipeline_dir), "--export_space", "unused", "--push_to_hub"])
    with pytest.raises(VqgenError, match="--queue_size 0: .* at least 1"):
        main(["--pipeline", str(pipeline_dir), "--queue_size", "0"])


def test_an_unconditional_pipeline_hides_the_class_and_redraws_with_num_images(stage1, tmp_path):
    from stage1_vqvae.model import VQVAE
    from stage2_prior.app import AppModel, build_app
    from stage2_prior.model import load_prior
    from stage2_prior.pipeline import VQGenPipeline

    _, vqvae_dir, codes = stage1
    prior = train2(tmp_path / "s2", codes, "data.conditional=false", "train.max_steps=1", "train.checkpoint_every=0")
    model = AppModel(VQGenPipeline(VQVAE.from_pretrained(vqvae_dir), load_prior(prior)), source="here")
    page = build_app(model).config
    hidden = {c["props"].get("elem_id"): c["props"].get("visible") for c in page["components"]}
    assert hidden["class"] is False and model.class_choices == []
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # the page reports nothing home unless asked to
    images, record = model.generate(None, 2, model.settings(3.0, 1.0, 0, 1.0), 4)
    want = model.pipe(num_images=2, generator=torch.Generator().manual_seed(4), decoding="sequential",
                      temperature=1.0, guidance_scale=1.0)  # fmt: skip
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, want.images))
    assert "--num_images 2" in record["sample_py"] and "--guidance_scale" not in record["sample_py"]


LEAVER = """
import time
from gradio_client import Client
job = Client({url!r}, verbose=False).submit("a", 1, 1.0, 1.0, 0, 1.0, {seed}, "sequential", api_name="/generate")
while job.status().code.name != {until!r}:
    time.sleep(0.02)
print({until!r}, flush=True)
job.result()
"""


def test_a_burst_past_the_queue_is_told_busy_leavers_free_their_place_and_the_page_serves_on(pipeline_dir):
    """A page with room for 2 waiting visitors, generation slowed to 3 s (30 sampler steps of 0.1 s): 8 visitors at
    once get 3 grids and 5 "queue is full" answers at once, no other error; a visitor who leaves while waiting gives
    up their place, and one who leaves mid-generation stops it at its next step, so the next visitor starts at
    once and the abandoned generation never finishes; afterwards a request is served as before."""
    import time

    from gradio_client import Client
    from gradio_client.utils import QueueError

    from stage2_prior.app import build_app, load_model, serve

    model = load_model(str(pipeline_dir), "cpu")
    starts, finished, real = [], [], model.generate

    def slow(class_name, n, settings, seed, decoding="sequential", progress=None):
        starts.append(time.monotonic())
        for _ in range(30):
            time.sleep(0.1)
            progress(1)  # the sampler's callback: where a gone visitor's generation stops
        finished.append(seed)
        return real(class_name, n, settings, seed, decoding, progress=progress)

    model.generate = slow
    port = free_port()
    demo = serve(build_app(model), 2, prevent_thread_lock=True, server_port=port, quiet=True)
    url = f"http://127.0.0.1:{port}/"

    def leaver(seed: int, until: str) -> None:  # a visitor in another process, gone once `until`
        proc = subprocess.Popen([sys.executable, "-c", LEAVER.format(url=url, seed=seed, until=until)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == until
        proc.kill()
        proc.wait()

    try:
        client = Client(url, verbose=False)
        jobs = [client.submit("a", 2, 1.0, 1.0, 0, 1.0, i, "sequential", api_name="/generate") for i in range(8)]
        served, busy = 0, 0
        for job in jobs:
            try:
                served += len(job.result(timeout=60)[0]) == 2
            except QueueError as e:
                busy += "Queue is full" in str(e)
        assert (served, busy) == (3, 5)

        starts.clear()
        finished.clear()
        first = client.submit("a", 1, 1.0, 1.0, 0, 1.0, 10, "sequential", api_name="/generate")
        leaver(11, "IN_QUEUE")  # waiting behind the first, then gone
        first.result(timeout=30)
        leaver(12, "PROGRESS")  # its generation running, then gone
        gone = time.monotonic()
        images, record = client.predict("a", 1, 1.0, 1.0, 0, 1.0, 13, "sequential", api_name="/generate")
        print(f"the next visitor started {starts[2] - gone:.2f} s after one left mid-generation")  # (pytest -s)
        assert len(starts) == 3 and starts[2] - gone < 1.5  # 11 never ran; 12 stopped at its next step
        assert finished == [10, 13] and len(images) == 1 and record["seed"] == 13
    finally:
        demo.close()
