"""``swintormer app`` end to end: the app started on a free localhost port with the shipped
model, driven by Playwright in Debian's headless Chromium (upload, wait, compare, download), and
the download checked against what ``swintormer deblur`` writes for the same settings; plus the
server's guards (host, origin, bad uploads) over plain HTTP.

The browser test needs Playwright and ``/usr/bin/chromium`` (``make test`` installs both). Outside
CI it is skipped, with the reason, when either is missing; in CI (``CI`` set) it must run.
"""

from __future__ import annotations

import http.client
import importlib.util
import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from icc_profiles import display_p3_profile
from PIL import Image

from pipelines import deblur

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def app_url() -> str:
    """The app on a free port (``--port 0``), shipped model, CPU; stopped after the module."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.app", "--port", "0", "--no-browser"],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=180)
    except queue.Empty:
        process.kill()
        pytest.fail(f"the app did not start: {process.stderr.read()[-2000:]}")
    match = re.search(r"http://127\.0\.0\.1:\d+/", first)
    assert match, first
    yield match.group(0)
    process.terminate()
    process.wait(timeout=30)


def photo(path: Path) -> bytes:
    """A small JPEG as a camera writes it: Display P3 profile, EXIF orientation 6 and model."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:72, 0:96] / 96.0
    channels = [np.sin(2 * np.pi * (rng.random() * 3 * x + rng.random() * 3 * y)) for _ in range(3)]
    samples = np.rint((np.stack(channels, axis=2) * 0.4 + 0.5) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0110] = "Test Camera"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(samples).save(path, "JPEG", quality=90, icc_profile=display_p3_profile(), exif=exif.tobytes())
    return path.read_bytes()


def need_browser() -> None:
    missing = [what for what, present in (("Chromium at /usr/bin/chromium", CHROMIUM.exists()),
                                          ("the playwright package", importlib.util.find_spec("playwright") is not None))
               if not present]
    if missing:
        message = f"{' and '.join(missing)} not installed (make test installs both)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {message}")
        pytest.skip(message)


def test_the_page_deblurs_a_photo_and_the_download_equals_the_command_line_result(
    app_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need_browser()
    from playwright.sync_api import sync_playwright

    source = tmp_path / "in" / "holiday.jpg"
    photo(source)
    settings = ["--tile", "128", "--stride", "96", "--precision", "fp32"]
    assert deblur.main([str(source), "--output", str(tmp_path / "cli"), "--no-progress", *settings]) == 0, \
        capsys.readouterr().err
    expected = (tmp_path / "cli" / "holiday.jpg").read_bytes()

    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(app_url)
            page.click("summary")  # open the advanced settings
            page.fill("#tile", "128")
            page.fill("#stride", "96")
            page.select_option("#precision", "fp32")
            page.set_input_files("#file", str(source))
            page.wait_for_selector("body[data-state=done]", timeout=180_000)
            status = page.inner_text("#status")
            assert status.startswith("Done: 72×96"), status  # upright: 72 wide, 96 high
            sizes = page.evaluate("[...document.querySelectorAll('#compare img')].map(i => [i.naturalWidth, i.naturalHeight])")
            assert sizes == [[72, 96], [72, 96]]  # after and before previews both loaded
            page.locator("#slider").fill("20")
            assert page.evaluate("getComputedStyle(document.getElementById('compare')).getPropertyValue('--pos')") == "20%"
            with page.expect_download() as download_info:
                page.click("#download")
            download = download_info.value
            assert download.suggested_filename == "holiday.jpg"
            downloaded = Path(download.path()).read_bytes()
        finally:
            browser.close()

    assert downloaded == expected  # the same file, metadata included
    with Image.open(io.BytesIO(downloaded)) as got, Image.open(tmp_path / "cli" / "holiday.jpg") as cli:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(cli))
        assert got.info["icc_profile"] == display_p3_profile()
        assert got.getexif()[0x0110] == "Test Camera" and got.getexif()[0x0112] == 1
    origin = urllib.parse.urlsplit(app_url).netloc
    assert requested and {urllib.parse.urlsplit(url).netloc for url in requested} == {origin}  # nothing external


def request(app_url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    url = urllib.parse.urlsplit(app_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_the_server_guards_its_door(app_url: str, tmp_path: Path) -> None:
    status, headers, page = request(app_url, "GET", "/")
    assert status == 200 and b"://" not in page  # no address of any other site in the page
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # Another host name (DNS rebinding) and another site's page posting an upload are refused.
    status, _, _ = request(app_url, "GET", "/", headers={"Host": "attacker.example:80"})
    assert status == 421
    data = photo(tmp_path / "p.jpg")
    status, _, body = request(app_url, "POST", "/api/jobs?name=p.jpg", data, {"Origin": "http://attacker.example"})
    assert status == 403 and "own page" in json.loads(body)["error"]
    status, _, body = request(app_url, "POST", "/api/jobs?name=p.gif", data)
    assert status == 400 and "unsupported format '.gif'" in json.loads(body)["error"]
    status, _, body = request(app_url, "POST", "/api/jobs?name=p.jpg&tile=abc", data)
    assert status == 400 and "tile must be a whole number" in json.loads(body)["error"]
    # A damaged photo: the job fails with the reader's one-line reason.
    status, _, body = request(app_url, "POST", "/api/jobs?name=broken.jpg", data[: len(data) // 3])
    assert status == 202
    job = json.loads(body)["id"]
    for _ in range(600):
        status, _, body = request(app_url, "GET", f"/api/jobs/{job}")
        state = json.loads(body)
        if state["state"] in ("done", "error"):
            break
        threading.Event().wait(0.1)
    assert state["state"] == "error" and state["error"].startswith("broken.jpg: corrupt or truncated JPEG")
    status, _, _ = request(app_url, "GET", f"/api/jobs/{job}/result")
    assert status == 409
