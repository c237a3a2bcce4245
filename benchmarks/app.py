"""The app's start and generate times on the demo pipeline (a row group of `make bench`), and the browser driver
that its browser test and the README's screenshot share.

    python -m benchmarks.app [--pipeline runs/demo/pipeline] [--repeats 5] [--screenshot docs/app.png]

Start: from `load_model` to a page that answers HTTP, after the imports (timed on their own). Generate: a
10-image grid with the page's defaults (the prior's recommended settings), through gradio_client over HTTP,
against `VQGenPipeline` called directly with the same settings in the same run (the page's overhead is the
ratio). Targets: start < 10 s, grid < 2 s on 2 cores.

The browser driver runs Debian's Chromium headless through Selenium and its system chromedriver: nothing is
downloaded (`apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) from the system, or None when either is missing."""
    browser = next((p for p in CHROMIUM if Path(p).is_file()), shutil.which("chromium"))
    driver = CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def browser_generate(url: str, class_name: str | None, seed: int, screenshot: Path | None = None,
                     timeout: float = 120) -> dict:  # fmt: skip
    """Open the page in headless Chromium, pick the class and the seed, click Generate, wait for the grid.

    Returns {"images": how many the grid shows, "record": the page's settings JSON as shown, whitespace
    removed}; saves a
    screenshot of the page when asked."""
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    found = browser_paths()
    if found is None:
        raise RuntimeError("no system Chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    try:
        wait = WebDriverWait(driver, timeout)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
        if class_name is not None:
            box = driver.find_element(By.CSS_SELECTOR, "#class input")
            box.click()
            option = wait.until(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li")
                                           if o.get_attribute("aria-label") == class_name])  # fmt: skip
            option[0].click()
        seed_box = driver.find_element(By.CSS_SELECTOR, "#seed input")
        seed_box.send_keys(Keys.CONTROL, "a")
        seed_box.send_keys(str(seed), Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def shown_record(d) -> str:  # the settings JSON as the page shows it, whitespace removed
            return "".join(d.find_element(By.CSS_SELECTOR, "#record").text.split())

        def settled(d):  # the grid is filled and the settings shown are this click's
            return d.find_elements(By.CSS_SELECTOR, "#grid button.thumbnail-item img") and f'"seed":{seed},' in (
                shown_record(d)
            )

        try:
            wait.until(settled)
        except TimeoutException:
            if screenshot is not None:
                driver.save_screenshot(str(screenshot))
            shown = shown_record(driver)
            raise RuntimeError(f"no grid for seed {seed} after {timeout} s; the page shows: {shown[:300]!r}") from None
        images = driver.find_elements(By.CSS_SELECTOR, "#grid button.thumbnail-item img")
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                 for i in images))  # fmt: skip
        record = shown_record(driver)
        if screenshot is not None:
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(screenshot))
        return {"images": len(images), "record": record}
    finally:
        driver.quit()


def bench(pipeline: str, repeats: int, row, screenshot: Path | None = None) -> None:
    """The rows of `make bench`: imports, start, a 10-image grid over HTTP and directly."""
    import torch

    start = time.perf_counter()
    import gradio  # noqa: F401
    from gradio_client import Client

    from stage2_prior.app import build_app, load_model, serve

    imports = time.perf_counter() - start
    start = time.perf_counter()
    model = load_model(pipeline, "cpu")
    demo = build_app(model)
    port = free_port()
    serve(demo, prevent_thread_lock=True, server_port=port, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    started = time.perf_counter() - start
    row("app start (load pipeline, build page, serve)", f"{started:.2f} s", "< 10 s",
        f"{pipeline}; imports before it {imports:.1f} s (gradio, torch, transformers)")  # fmt: skip
    try:
        d = model.defaults
        first = model.class_choices[0] if model.class_choices else None
        page_args = (first, 10, d.guidance_scale, d.temperature, d.top_k or 0, d.top_p or 1.0, 0, "sequential")
        settings = model.settings(*page_args[2:6])
        classes = [first] * 10 if first is not None else None
        times = {"page": [], "direct": []}
        for i in range(repeats + 1):  # interleaved; the first of each is a warm-up
            t0 = time.perf_counter()
            client.predict(*page_args, api_name="/generate")
            t1 = time.perf_counter()
            model.pipe(classes=classes, num_images=10, generator=torch.Generator().manual_seed(0),
                       decoding="sequential", **settings)  # fmt: skip
            t2 = time.perf_counter()
            if i:
                times["page"].append(t1 - t0)
                times["direct"].append(t2 - t1)
        page, direct = statistics.median(times["page"]), statistics.median(times["direct"])
        row("app: 10-image grid, page defaults, over HTTP", f"{page:.2f} s", "< 2 s",
            f"VQGenPipeline directly {direct:.2f} s (x{page / direct:.2f}); median of {repeats}")  # fmt: skip
        if screenshot is not None:
            shown = browser_generate(f"http://127.0.0.1:{port}/", first, 0, screenshot)
            print(f"screenshot of a {shown['images']}-image grid: {screenshot}", file=sys.stderr)
    finally:
        demo.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(ROOT / "runs" / "demo" / "pipeline"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshot", default=None, help="also save the page in headless Chromium here")
    args = parser.parse_args(argv)
    if not (Path(args.pipeline) / "pipeline.json").is_file():
        raise SystemExit(f"no pipeline at {args.pipeline}: run `make demo` first (or pass --pipeline)")
    print("| what | figure | target | detail |\n|---|---|---|---|")

    def row(*cells):
        print("| " + " | ".join(cells) + " |", flush=True)

    bench(args.pipeline, args.repeats, row, Path(args.screenshot) if args.screenshot else None)


if __name__ == "__main__":
    main()
