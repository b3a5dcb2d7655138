"""A screenshot of the reader-study page at its first scored item, for the documentation.

    python -m cxr_diffusion.reader_study.screenshot --out docs/figures/reader_study.png [--kit reports/reader_study]

Without ``--kit`` it builds a small demo kit of phantom radiographs (real) and blurred, noisier phantoms
(standing in for generations) in a temporary folder. Needs Chromium, chromedriver and selenium.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from cxr_diffusion.io import atomic_path
from cxr_diffusion.reader_study.browser import headless_chromium
from cxr_diffusion.reader_study.items import StudyItem
from cxr_diffusion.reader_study.kit import build_kit, read_kit_manifest

DEMO_FINDINGS = ["Atelectasis", "Effusion", "Infiltration", "Nodule/Mass"]
_DEMO_CASES = [(), ("Effusion",), ("Infiltration",), ("Nodule",), ("Atelectasis",), ("Effusion", "Infiltration")]


def capture_first_item(kit_dir: Path, out_png: Path, reader_id: str = "reader-01", width: int = 1280,
                       height: int = 900) -> Path:
    """Open the kit, enter ``reader_id``, step past the calibration items and save the page as a PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    calibration = len(read_kit_manifest(kit_dir)["calibration"])
    with tempfile.TemporaryDirectory() as profile:
        driver = headless_chromium(Path(profile), width=width, height=height)
        try:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            driver.get((Path(kit_dir).resolve() / "index.html").as_uri())
            driver.find_element(By.ID, "reader-id").send_keys(reader_id + Keys.ENTER)
            body = driver.find_element(By.TAG_NAME, "body")
            for _ in range(calibration):
                body.send_keys(Keys.ARROW_RIGHT)
            deadline = time.monotonic() + 10
            while not driver.execute_script("const i = document.getElementById('image');"
                                            "return i.complete && i.naturalWidth > 0"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the first image of {kit_dir} did not load")
                time.sleep(0.05)
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    with atomic_path(out_png) as tmp:
        tmp.write_bytes(png)
    return Path(out_png)


def demo_items(size: int = 512, per_source: int = 6) -> list[StudyItem]:
    """Phantom radiographs as real images and degraded phantoms as stand-in generations."""
    from scipy.ndimage import gaussian_filter

    from cxr_diffusion.data.phantom.assets import load_phantom_assets
    from cxr_diffusion.data.phantom.render import PhantomStudy, render_study

    assets, rng = load_phantom_assets(), np.random.default_rng(0)
    items = []
    for index in range(2 * per_source):
        findings = _DEMO_CASES[index % len(_DEMO_CASES)]
        study = PhantomStudy(image_index=f"{index + 1:08d}_000.png", patient_id=index + 1, follow_up=0,
                             findings=findings, view="PA", age=40 + index, gender="MF"[index % 2])
        pixels = render_study(study, assets, size, seed=index)
        source = "real"
        if index % 2:
            noisy = gaussian_filter(pixels.astype(np.float32), 1.2) + rng.normal(0, 6, pixels.shape)
            pixels, source = np.clip(noisy, 0, 255).astype(np.uint8), "demo_generated"
        labels = tuple("Nodule/Mass" if name in ("Nodule", "Mass") else name for name in findings) or ("No Finding",)
        items.append(StudyItem(pixels=pixels, source=source, labels=labels, origin_id=study.image_index))
    return items


def main(out: Path = typer.Option(Path("docs/figures/reader_study.png"), help="Where to write the PNG."),
         kit: Path = typer.Option(None, help="A built kit folder; without it, a demo kit of phantoms."),
         reader_id: str = typer.Option("reader-01", help="The reader id typed on the first page.")) -> None:
    if kit is not None:
        typer.echo(capture_first_item(kit, out, reader_id))
        return
    with tempfile.TemporaryDirectory() as folder:
        demo = Path(folder) / "kit"
        build_kit(demo_items(), demo, Path(folder) / "key.json", "demo-study", DEMO_FINDINGS, calibration=2,
                  display_size=512, study_key=b"demo-study")  # a fixed key: the same figure every run
        typer.echo(capture_first_item(demo, out, reader_id))


if __name__ == "__main__":
    typer.run(main)
