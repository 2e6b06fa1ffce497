"""``swintormer deblur`` against hostile inputs and interrupted batches, through real processes:
decompression bombs and huge headers refused before decoding with bounded peak memory, a kill -9
mid-batch finished by ``--skip-existing``, existing outputs never silently replaced, Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swintormer.photo import MEMORY_SHARE, PhotoError, fit_settings, image_bytes, window_bytes
from swintormer.core.image_containers import PNG_SIGNATURE, png_chunk
from swintormer.models import Swintormer, SwintormerConfig
from swintormer.pipeline import DeblurPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
TILE = 128
PEAK_LIMIT_BYTES = 3 * 1024**3
# Runs a command and prints the peak resident memory of its process tree (ru_maxrss of the
# waited-for children, in KiB on Linux): a fresh process, so nothing else is counted.
MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.deblur", *args, "--no-progress"]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def png_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, "PNG")
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of zeros: every row is filter byte 0 and zero samples,
    deflated row by row, so the file is under a megabyte while decoding needs width×height bytes."""
    row = b"\x00" * (1 + width)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """An RGB PNG whose IHDR declares ``width``×``height`` and whose data is a few zero bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def jpeg_header_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare ``width``×``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def random_u8(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------


def test_bombs_and_damaged_files_are_refused_in_one_line_with_bounded_memory(
    model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(png_bytes(random_u8((40, 56, 3), 1)))
    (folder / "b_bomb.png").write_bytes(png_bomb(30000, 30000))
    (folder / "c_bomb.jpg").write_bytes(jpeg_header_claiming(30000, 30000))
    (folder / "d_huge.png").write_bytes(png_header_only(100000, 100000))
    good = png_bytes(random_u8((40, 56, 3), 2))
    (folder / "e_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "f_good.png").write_bytes(png_bytes(random_u8((48, 40, 3), 3)))
    assert (folder / "b_bomb.png").stat().st_size < 2 * 1024 * 1024  # small file, 900 Mpx inside

    finished = subprocess.run(
        [sys.executable, "-c", MEASURE, *command(str(folder), "--output", str(tmp_path / "out"),
                                                 "--model", str(model_dir), "--tile", str(TILE))],
        capture_output=True, text=True, cwd=REPO_ROOT, env=environment(), timeout=600,
    )

    assert finished.returncode == 1, finished.stderr
    assert "Traceback" not in finished.stderr
    errors = error_lines(finished.stderr)
    assert len(errors) == 4, finished.stderr
    by_file = {name: [line for line in errors if str(folder / name) in line]
               for name in ("b_bomb.png", "c_bomb.jpg", "d_huge.png", "e_truncated.png")}
    assert all(len(lines) == 1 for lines in by_file.values()), by_file
    assert "30000×30000 (900 Mpx), above the limit of 200 Mpx" in by_file["b_bomb.png"][0]
    assert "30000×30000 (900 Mpx), above the limit of 200 Mpx" in by_file["c_bomb.jpg"][0]
    assert "100000×100000 (10000 Mpx)" in by_file["d_huge.png"][0]
    assert "corrupt or truncated PNG" in by_file["e_truncated.png"][0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.png", "f_good.png"]
    assert "wrote 2 of 6" in finished.stderr
    peak = int(finished.stdout.split("MAXRSS_KIB")[1].split()[0]) * 1024
    print(f"peak resident memory of the run: {peak / 2**20:.0f} MiB")
    assert peak < PEAK_LIMIT_BYTES, f"peak {peak / 2**30:.2f} GiB"


def test_memory_estimate_lowers_the_batch_then_refuses(model_dir: Path) -> None:
    pipe = DeblurPipeline.from_pretrained(model_dir, tile=256, batch_size=4)
    plenty = fit_settings(2000, 3000, pipe, 64 * 1024**3, "x.png")
    assert (plenty.settings.tile, plenty.settings.batch_size, plenty.notes) == (256, 4, [])
    width = pipe.model.config.dim
    # Room for the image and two 256² windows: the batch goes down to 2.
    room = int((image_bytes(2000, 3000) + window_bytes(width, 256, 256, 2)) / MEMORY_SHARE) + 1
    tight = fit_settings(2000, 3000, pipe, room, "x.png")
    assert (tight.settings.tile, tight.settings.batch_size) == (256, 2)
    assert tight.notes == ["window batch lowered from 4 to 2 to fit the available memory (0.5 GB)"]
    # Room for one 128² window only: batch 1, tile halved to the model's multiple.
    room = int((image_bytes(2000, 3000) + window_bytes(width, 128, 128, 1)) / MEMORY_SHARE) + 1
    tighter = fit_settings(2000, 3000, pipe, room, "x.png")
    assert (tighter.settings.tile, tighter.settings.batch_size) == (128, 1)
    assert "tile lowered from 256 to 128" in tighter.notes[1]
    with pytest.raises(PhotoError, match=r"x.png: needs about 50.\d GB of memory, 8.6 GB available"):
        fit_settings(30000, 30000, pipe, 8 * 1024**3, "x.png")
    small = fit_settings(60, 90, pipe, None, "x.png")  # the tile capped at the image's size
    assert small.capped_to_image and small.settings.tile == 128


def test_kill_mid_batch_then_skip_existing_redoes_only_the_unfinished(model_dir: Path, tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    names = [f"img{index}.png" for index in range(5)]
    for index, name in enumerate(names):
        (folder / name).write_bytes(png_bytes(random_u8((384, 384, 3), 10 + index)))
    args = [str(folder), "--output", str(out), "--model", str(model_dir), "--tile", str(TILE), "--batch", "1"]

    process = subprocess.Popen(command(*args), cwd=REPO_ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / names[0]).exists():
        assert process.poll() is None, "the run ended before its first output"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)

    done = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in out.glob("img*.png")}
    assert names[0] in done and len(done) < len(names), done
    # What a writer killed while writing leaves (named like swintormer.core.files' temporaries),
    # a damaged output that is not ours to trust, and someone else's hidden file.
    (out / f".{names[-1]}.k3j2h1.tmp").write_bytes(b"half an image")
    damaged = next(name for name in reversed(names) if name not in done)
    (out / damaged).write_bytes(png_bytes(random_u8((384, 384, 3), 99))[:500])
    (out / ".notes.txt").write_text("not ours")

    finished = subprocess.run(command(*args, "--skip-existing"), capture_output=True, text=True, cwd=REPO_ROOT,
                              env=environment(), timeout=600)

    assert finished.returncode == 0, finished.stderr
    redone = len(names) - len(done)
    assert f"wrote {redone} of {len(names)} image(s)" in finished.stdout
    assert f"skipped {len(done)} already done" in finished.stdout
    for name, (inode, mtime) in done.items():  # finished outputs were left as they were
        assert (out / name).stat().st_ino == inode and (out / name).stat().st_mtime_ns == mtime
    for name in names:
        with Image.open(out / name) as image:
            image.load()  # complete and readable, the damaged one included
            assert image.size == (384, 384)
    assert not list(out.glob(".*.tmp"))
    assert (out / ".notes.txt").read_text() == "not ours"


def test_existing_output_is_an_error_unless_asked(model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in" / "pic.png"
    source.parent.mkdir()
    source.write_bytes(png_bytes(random_u8((30, 40, 3), 20)))
    other = tmp_path / "in" / "other.png"
    other.write_bytes(png_bytes(random_u8((30, 40, 3), 21)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "pic.png").write_bytes(b"an older result, kept unless asked")
    args = [str(source.parent), "--output", str(out), "--model", str(model_dir), "--tile", str(TILE)]

    finished = subprocess.run(command(*args), capture_output=True, text=True, cwd=REPO_ROOT, env=environment(),
                              timeout=300)
    assert finished.returncode == 1
    [line] = error_lines(finished.stderr)
    assert line == (f"error: {source}: its output {out / 'pic.png'} already exists; pass --overwrite to replace it "
                    "or --skip-existing to keep it")
    assert (out / "pic.png").read_bytes() == b"an older result, kept unless asked"
    assert (out / "other.png").is_file()

    finished = subprocess.run(command(*args, "--overwrite"), capture_output=True, text=True, cwd=REPO_ROOT,
                              env=environment(), timeout=300)
    assert finished.returncode == 0, finished.stderr
    with Image.open(out / "pic.png") as image:
        assert image.size == (40, 30)


def test_ctrl_c_stops_after_the_image_in_progress(model_dir: Path, tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    names = [f"img{index}.png" for index in range(5)]
    for index, name in enumerate(names):
        (folder / name).write_bytes(png_bytes(random_u8((384, 384, 3), 30 + index)))
    process = subprocess.Popen(
        command(str(folder), "--output", str(out), "--model", str(model_dir), "--tile", str(TILE), "--batch", "1"),
        cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / names[0]).exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: stopping after the image in progress" in stderr
    written = sorted(path.name for path in out.glob("img*.png"))
    assert 1 <= len(written) <= 2 and written == names[: len(written)]  # the one in progress was finished
    [summary] = [line for line in stderr.splitlines() if line.startswith("stopped by Ctrl-C")]
    assert f"wrote {len(written)} of 5" in summary and "--skip-existing" in summary
    assert not list(out.glob(".*.tmp"))


def test_any_exception_is_one_line_for_its_image_and_the_rest_goes_on(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import swintormer.photo
    from pipelines import deblur

    folder = tmp_path / "in"
    folder.mkdir()
    for name, seed in (("a.png", 40), ("b.png", 41), ("c.png", 42)):
        (folder / name).write_bytes(png_bytes(random_u8((20, 24, 3), seed)))
    real = swintormer.photo.restore_photo

    def flaky(source, *args, **kwargs):
        if Path(source).name == "a.png":
            raise MemoryError()
        if Path(source).name == "b.png":
            raise RuntimeError("a kernel failed\nwith a second line")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(swintormer.photo, "restore_photo", flaky)
    code = deblur.main([str(folder), "--output", str(tmp_path / "out"), "--model", str(model_dir),
                        "--tile", str(TILE), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert error_lines(err) == [
        f"error: {folder / 'a.png'}: out of memory while processing this image (MemoryError)",
        f"error: {folder / 'b.png'}: RuntimeError: a kernel failed with a second line",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.png"]


def test_tile_notes_capped_once_and_warned_when_not_the_training_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines import deblur

    torch.manual_seed(0)
    trained = DeblurPipeline(Swintormer(SwintormerConfig.preset("tiny", in_channels=3)))
    trained.settings = trained.settings.model_copy(update={"tile": 128})
    trained.save_pretrained(tmp_path / "model")  # pipeline.json records tile 128
    folder = tmp_path / "in"
    folder.mkdir()
    for name, seed in (("a.png", 50), ("b.png", 51)):
        (folder / name).write_bytes(png_bytes(random_u8((30, 40, 3), seed)))

    code = deblur.main([str(folder), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "model"),
                        "--tile", "512", "--no-progress"])

    err = capsys.readouterr().err
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        "warning: --tile 512 differs from the 128 px the model was trained at (its pipeline.json); "
        "results are usually best at the training size"]
    capped = [line for line in err.splitlines() if "larger than some images need" in line]
    assert len(capped) == 1 and "(e.g. 128 for" in capped[0]  # said once for the two images
