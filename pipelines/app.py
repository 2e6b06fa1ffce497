"""``swintormer app``: a local web page to deblur one photo at a time, for people who do not use
a terminal.

    swintormer app                 # opens http://127.0.0.1:8765/ in the browser

Drop a photo on the page: it is deblurred on this computer with the default model (on the CPU
unless ``--device`` says otherwise), the page shows the original and the result side by side
under a slider, and *Download* gives the result file with its metadata: the same bytes
``swintormer deblur`` writes for the same settings (both call :func:`swintormer.photo.restore_photo`).
Tile, stride and precision are the page's advanced settings.

The server is Python's own ``http.server`` and the page (``app_page.html``, beside this file) is
one HTML file with its script and styles inline: nothing is loaded from the internet (no fonts,
scripts or analytics; the page's Content-Security-Policy forbids other origins), so it works
offline. It listens on 127.0.0.1 only unless ``--host`` says otherwise, answers only requests
addressed to that host name (a guard against DNS rebinding) and refuses uploads posted from
other sites' pages (their ``Origin``). Photos are processed one at a time in a worker thread;
the last few results are kept in memory, nothing is written to disk.

HTTP interface (used by the page): ``POST /api/jobs?name=FILE&tile=&stride=&precision=`` with the
file's bytes as the body answers ``{"id": ...}``; ``GET /api/jobs/ID`` the job's state;
``GET /api/jobs/ID/before.png`` and ``/after.png`` previews (8-bit, at most 1600 px, with the
image's ICC profile so the browser shows its colours); ``GET /api/jobs/ID/result`` the file.
"""

from __future__ import annotations

import argparse
import json
import queue
import secrets
import sys
import threading
import time
import traceback
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli import positive_int

if TYPE_CHECKING:
    import numpy as np

    from swintormer.pipeline import DeblurPipeline

PAGE = Path(__file__).resolve().with_name("app_page.html")
DEFAULT_PORT = 8765
PREVIEW_SIDE = 1600
KEPT_JOBS = 4
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                           "script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; base-uri 'none'")


@dataclass
class Job:
    id: str
    name: str
    data: bytes | None
    tile: int | None
    stride: int | None
    precision: str
    state: str = "queued"  # queued, running, done, error
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    filename: str | None = None
    result: bytes | None = None
    before_png: bytes | None = None
    after_png: bytes | None = None
    seconds: float | None = None
    size: tuple[int, int] | None = None

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "error": self.error, "notes": self.notes,
                "filename": self.filename, "seconds": self.seconds,
                "width": self.size[0] if self.size else None, "height": self.size[1] if self.size else None}


def preview_png(pixels: np.ndarray, alpha: np.ndarray | None, icc: bytes | None) -> bytes:
    """An 8-bit PNG of float RGB pixels (and alpha) for the browser, at most PREVIEW_SIDE pixels
    on its longer side (area averaging), with the image's ICC profile embedded."""
    import cv2
    import numpy as np

    from swintormer.core import image_containers
    from swintormer.core.image_io import PNG_COMPRESSION_LEVEL, quantize

    height, width = pixels.shape[:2]
    scale = min(1.0, PREVIEW_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    colour = pixels if scale == 1.0 else cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    samples = quantize(colour, 8)[:, :, ::-1]
    if alpha is not None:
        alpha8 = alpha if alpha.dtype == np.uint8 else (alpha.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        if scale != 1.0:
            alpha8 = cv2.resize(alpha8, size, interpolation=cv2.INTER_AREA)
        samples = np.dstack([samples, alpha8])
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(samples), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION_LEVEL])
    if not ok:
        raise ValueError("preview encoding failed")
    png = encoded.tobytes()
    return image_containers.insert_png_chunks(png, [image_containers.iccp_chunk(icc)]) if icc else png


class App:
    """The model, the job list and the worker thread behind the HTTP handler."""

    def __init__(self, pipe: DeblurPipeline, max_megapixels: float) -> None:
        from swintormer.photo import PhotoOptions

        self.pipe = pipe
        self.options = PhotoOptions(max_megapixels=max_megapixels)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.queue: queue.Queue[Job] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="deblur-worker", daemon=True)
        self.worker.start()

    def defaults(self) -> dict:
        settings = self.pipe.settings
        return {"tile": settings.tile, "stride": settings.stride, "precision": settings.precision,
                "batch": settings.batch_size, "max_megapixels": self.options.max_megapixels,
                "size_multiple": self.pipe.model.config.size_multiple}

    def submit(self, name: str, data: bytes, tile: int | None, stride: int | None, precision: str) -> Job:
        job = Job(id=secrets.token_urlsafe(12), name=name, data=data, tile=tile, stride=stride, precision=precision)
        with self.lock:
            self.jobs[job.id] = job
            while len(self.jobs) > KEPT_JOBS:
                oldest = next(iter(self.jobs.values()))
                if oldest.state in ("queued", "running"):
                    break
                self.jobs.popitem(last=False)
        self.queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            job.state = "running"
            started = time.perf_counter()
            try:
                self._run(job)
                job.state = "done"
            except Exception as error:  # any failure is this photo's: shown on the page
                message = " ".join(str(error).split()) if not isinstance(error, MemoryError) else ""
                job.error = message or f"{type(error).__name__} (out of memory?)"
                job.state = "error"
                if not isinstance(error, (ValueError, OSError, MemoryError)):
                    traceback.print_exc()
            finally:
                job.data = None
                job.seconds = time.perf_counter() - started

    def _run(self, job: Job) -> None:
        from swintormer.photo import pipeline_settings, restore_photo
        from swintormer.core.image_io import output_file_name, read_image_file

        update = {"precision": job.precision}
        if job.tile is not None:
            update["tile"] = job.tile
        if job.stride is not None:
            update["stride"] = job.stride
        settings = self.pipe.settings.model_copy(update=update)
        if settings.stride is not None and settings.stride > settings.tile:
            raise ValueError(f"stride {settings.stride} is larger than the tile {settings.tile}; windows would leave gaps")
        with pipeline_settings(self.pipe, settings):
            restored = restore_photo(job.data, self.pipe, self.options, name=job.name)
        image = restored.image
        job.filename = output_file_name(job.name, image.format, self.options.format)
        job.result = restored.encoded.data
        job.size = (image.width, image.height)
        job.notes = [*restored.fitted.notes, *restored.notes]
        job.before_png = preview_png(image.pixels, image.alpha, image.icc_profile)
        written = read_image_file(job.result, name=job.filename, max_megapixels=None)
        job.after_png = preview_png(written.pixels, written.alpha, written.icc_profile)


def _content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the UTF-8 name (RFC 6266, RFC 8187)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"


def make_handler(app: App, allowed_hosts: set[str] | None):
    """The request handler class; ``allowed_hosts`` are the ``Host`` headers answered (None: any,
    for a server opened to the network on purpose)."""
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "swintormer-app"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:  # quiet: one line per error only
            pass

        def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        def _host_ok(self) -> bool:
            if allowed_hosts is not None and self.headers.get("Host", "").lower() not in allowed_hosts:
                self._error(HTTPStatus.MISDIRECTED_REQUEST, "this server answers only on its local address")
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if not self._host_ok():
                return
            path = urllib.parse.urlsplit(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8",
                           {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "no-referrer"})
                return
            if path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
                return
            if path == "/api/info":
                self._json(HTTPStatus.OK, app.defaults())
                return
            parts = path.strip("/").split("/")
            if len(parts) >= 3 and parts[:2] == ["api", "jobs"]:
                job = app.get(parts[2])
                if job is None:
                    self._error(HTTPStatus.NOT_FOUND, "no such job (results are kept for the last few photos)")
                    return
                if len(parts) == 3:
                    self._json(HTTPStatus.OK, job.status())
                    return
                if job.state != "done":
                    self._error(HTTPStatus.CONFLICT, "the job is not done")
                    return
                if parts[3:] == ["before.png"]:
                    self._send(HTTPStatus.OK, job.before_png, "image/png")
                    return
                if parts[3:] == ["after.png"]:
                    self._send(HTTPStatus.OK, job.after_png, "image/png")
                    return
                if parts[3:] == ["result"]:
                    self._send(HTTPStatus.OK, job.result, "application/octet-stream",
                               {"Content-Disposition": _content_disposition(job.filename)})
                    return
            self._error(HTTPStatus.NOT_FOUND, "not found")

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            if not self._host_ok():
                return
            origin = self.headers.get("Origin")
            if origin is not None and urllib.parse.urlsplit(origin).netloc.lower() != self.headers.get("Host", "").lower():
                self._error(HTTPStatus.FORBIDDEN, "uploads are accepted from this app's own page only")
                return
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/api/jobs":
                self._error(HTTPStatus.NOT_FOUND, "not found")
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._error(HTTPStatus.LENGTH_REQUIRED, "the upload needs a Content-Length")
                return
            if length > MAX_UPLOAD_BYTES:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
                self.close_connection = True
                return
            data = self.rfile.read(length)
            try:
                name, tile, stride, precision = _job_parameters(urllib.parse.parse_qs(url.query))
            except ValueError as error:
                self._error(HTTPStatus.BAD_REQUEST, str(error))
                return
            if len(data) != length or not data:
                self._error(HTTPStatus.BAD_REQUEST, "the upload is empty or incomplete")
                return
            job = app.submit(name, data, tile, stride, precision)
            self._json(HTTPStatus.ACCEPTED, {"id": job.id})

    return Handler


def _job_parameters(query: dict[str, list[str]]) -> tuple[str, int | None, int | None, str]:
    from swintormer.core.image_io import photo_format_of, unsupported_format_message

    name = Path((query.get("name") or [""])[0]).name
    if not name:
        raise ValueError("the upload has no file name")
    if photo_format_of(name) is None:
        raise ValueError(unsupported_format_message(name))

    def number(key: str) -> int | None:
        text = (query.get(key) or [""])[0].strip()
        if not text:
            return None
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{key} must be a whole number of pixels, got {text!r}") from None
        if not 1 <= value <= 8192:
            raise ValueError(f"{key} must be between 1 and 8192 pixels, got {value}")
        return value

    precision = (query.get("precision") or ["fp32"])[0]
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return name, number("tile"), number("stride"), precision


def build_parser() -> argparse.ArgumentParser:
    from pipelines.deblur import DEFAULT_MAX_MEGAPIXELS, DEFAULT_MODEL_DIR, positive_number

    parser = argparse.ArgumentParser(
        prog="swintormer app",
        description=("A local web page to deblur photos: drop a photo, compare before and after with a "
                     "slider, download the result with its metadata (the same file 'swintormer deblur' "
                     "writes for the same settings). Runs on this computer; nothing is sent elsewhere."),
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, metavar="DIR",
                        help="model folder (default: the shipped model); models that need a prior are not supported")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this computer only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=4,
                        help="windows per forward pass, as 'swintormer deblur --batch' (default: %(default)s)")
    parser.add_argument("--max-megapixels", type=positive_number, default=DEFAULT_MAX_MEGAPIXELS, metavar="MPX",
                        help="refuse photos larger than this (default: %(default)g)")
    parser.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.deblur import set_opencv_pixel_limit

    set_opencv_pixel_limit(args.max_megapixels)
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is not a port number", file=sys.stderr)
        return 2
    from swintormer.pipeline import DeblurPipeline

    try:
        # The deblur command's defaults, so that the same settings give the same file.
        pipe = DeblurPipeline.from_pretrained(args.model, device=args.device, batch_size=args.batch,
                                              blend="average", precision="fp32")
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if pipe.needs_prior:
        print(f"error: the model {args.model} needs a prior for every image; the app runs models without "
              "one (use 'swintormer deblur --prior-...')", file=sys.stderr)
        return 2
    app = App(pipe, args.max_megapixels)
    try:
        server = ThreadingHTTPServer((args.host, args.port), None)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port} ({error.strerror or error})", file=sys.stderr)
        return 2
    port = server.server_address[1]
    if args.host in ("0.0.0.0", "::", ""):
        allowed = None  # every address of this machine, on purpose: any host name may reach it
    else:
        names = {args.host.lower(), f"[{args.host.lower()}]"}
        if args.host in ("127.0.0.1", "localhost", "::1"):
            names |= {"127.0.0.1", "localhost", "[::1]"}
        allowed = {f"{name}:{port}" for name in names}
    server.RequestHandlerClass = make_handler(app, allowed)
    server.daemon_threads = True
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    url = f"http://{shown}:{port}/"
    print(f"Swintormer app: {url} (Ctrl-C to stop)", flush=True)
    if not args.no_browser:
        import webbrowser

        threading.Timer(0.5, lambda: webbrowser.open(url)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
