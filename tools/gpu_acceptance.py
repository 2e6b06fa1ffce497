"""GPU acceptance: every job of the project, small but real, on one CUDA device, in one call.

    python tools/gpu_acceptance.py --json gpu_acceptance.json          # on a machine with CUDA
    python tools/gpu_acceptance.py --device cpu --json dry_run.json    # the same checks, tiny sizes

Rows (each PASS or FAIL with its figures; a failing row does not stop the others):

- ``train_swintormer bf16`` / ``fp16``: stage two, ``configs/swintormer/cpu_small.yaml``
  (``small`` preset, 64×64 patches, batch 8), 50 steps in each mixed precision; steps/s, last
  loss, validation PSNR against the blurry input's;
- ``train_swintormer SIGTERM + resume``: the bf16 run again, SIGTERM once step 15 is logged
  (exit code 75, a checkpoint), then ``--resume auto`` to step 50 (exit 0, every step logged once);
- ``train_prior``: stage one, ``configs/prior/cpu_tiny.yaml``, 20 steps;
- ``cache_priors``: that prior sampled for every test image (10 DDIM steps), then ``--verify``;
- ``deblur 4K fp32`` / ``bf16``: the ``pipelines.deblur`` command (a subprocess, stable flags:
  ``--device cuda --precision P --model DIR --output DIR``) on a 3840×2160 synthetic image with
  the shipped model; its wall time, then an in-process ``DeblurPipeline`` run of the same image
  for seconds per megapixel and the peak CUDA memory (``torch.cuda.max_memory_allocated``);
- ``overlapped transfers``: the sliding-window inferencer's pinned, non-blocking CUDA path
  against its blocking path on a 512×512 crop (must be equal);
- ``paper forward 256² / 512²``, fp32 and bf16: one forward of the ``paper`` preset (random
  weights, 6 input channels, batch 1): median latency and peak CUDA memory.

Nothing is downloaded: the data are made by ``tools/make_synthetic_blur.py`` from
scikit-image's bundled photos, the prior has random weights (``tiny``), the deblurred model is
the shipped one. With ``--device cpu`` every row runs at tiny sizes (4-8 steps, 96×160 image,
32×32 forwards; fp16 autocast is a no-op there): a dry run of the script itself, which the test
suite runs. Prints a table; ``--json`` writes the rows with the device, versions and date.
Exit code 0 when every row passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ROWS = [
    "train_swintormer bf16", "train_swintormer fp16", "train_swintormer SIGTERM + resume", "train_prior",
    "cache_priors", "deblur 4K fp32", "deblur 4K bf16", "overlapped transfers",
    "paper forward 256² fp32", "paper forward 512² fp32", "paper forward 256² bf16", "paper forward 512² bf16",
]
EXIT_STOPPED = 75


class Sizes:
    """What the checks run at: real on CUDA, tiny on the CPU."""

    def __init__(self, device: str) -> None:
        real = device != "cpu"
        self.train_steps = 50 if real else 4
        self.signal_at = 15 if real else 2
        self.resume_steps = 50 if real else 6
        self.prior_steps = 20 if real else 3
        self.cache_steps = 10 if real else 2
        self.image = (2160, 3840) if real else (96, 160)
        self.crop = 512 if real else 64
        self.forward_sides = {256: 256, 512: 512} if real else {256: 32, 512: 32}
        self.forward_repeats = 5 if real else 1
        self.synthetic = (["--max-size", "128", "--crop", "96", "--per-image", "3"] if real
                          else ["--max-size", "64", "--crop", "64", "--per-image", "2"])
        self.swintormer_config = "configs/swintormer/cpu_small.yaml" if real else "configs/swintormer/cpu_tiny.yaml"
        self.swintormer_overrides = (["train.batch_size=8", "train.validate_every_steps=50", "validation.max_images=4"]
                                     if real else ["train.batch_size=2", "train.validate_every_steps=1000",
                                                   "validation.max_images=1"])


class Acceptance:
    def __init__(self, device: str, workdir: Path) -> None:
        self.device = device
        self.workdir = workdir
        self.sizes = Sizes(device)
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        if device == "cpu":
            self.env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
        self.log = workdir / "log.txt"
        self.data = workdir / "data"
        self.rows: list[dict] = []

    # ---- helpers

    def python(self, *arguments: str, timeout: float = 900) -> tuple[int, float, str]:
        """Run ``python ARGS`` in the repository; returns (exit code, seconds, output tail)."""
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *arguments], cwd=REPO_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(f"$ python {' '.join(arguments)}\n{done.stdout}{done.stderr}\n")
        return done.returncode, time.perf_counter() - start, (done.stdout + done.stderr)[-1500:]

    def record(self, name: str, check: Callable[[], dict]) -> None:
        start = time.perf_counter()
        try:
            figures = check()
            row = {"check": name, "result": "PASS", **figures}
        except Exception as exc:  # one failing check must not hide the others' results
            row = {"check": name, "result": "FAIL", "error": f"{type(exc).__name__}: {exc}"[:600]}
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(traceback.format_exc())
        row["seconds"] = round(time.perf_counter() - start, 1)
        self.rows.append(row)
        print(f"{row['result']}  {name}  ({row['seconds']} s)  {summary(row)}", flush=True)

    def train_command(self, output: Path, steps: int, precision: str, *extra: str) -> list[str]:
        return ["-m", "pipelines.train_swintormer", "--config", self.sizes.swintormer_config, "--data", str(self.data),
                "--output", str(output), "--max-steps", str(steps), "train.logging.progress_bar=false",
                "train.logging.every_steps=1", f"train.mixed_precision={precision}", *self.sizes.swintormer_overrides,
                *extra]

    # ---- checks

    def make_data(self) -> None:
        if not (self.data / "manifest.json").is_file():
            code, _, tail = self.python("tools/make_synthetic_blur.py", "--out", str(self.data), *self.sizes.synthetic,
                                        "--blur", "defocus", "--seed", "1", "--defocus-radius", "1", "3",
                                        "--noise", "0", "0.005", "--quiet")
            if code != 0:
                raise SystemExit(f"error: could not make the synthetic data:\n{tail}")

    def train(self, precision: str) -> dict:
        run = self.workdir / f"train_{precision}"
        code, seconds, tail = self.python(*self.train_command(run, self.sizes.train_steps, precision, "--overwrite"))
        if code != 0:
            raise RuntimeError(f"exit code {code}: {tail}")
        lines = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
        losses = [line for line in lines if "loss" in line]
        validation = [line for line in lines if "val/psnr" in line]
        figures = {"steps": losses[-1]["step"], "steps_per_s": round(statistics.median(x["steps_per_s"] for x in losses[1:] or losses), 2),
                   "last_loss": round(losses[-1]["loss"], 4), "wall_s": round(seconds, 1)}
        if validation:
            figures.update({"val_psnr": round(validation[-1]["val/psnr"], 2),
                            "input_psnr": round(validation[-1]["val/input_psnr"], 2)})
        if figures["steps"] != self.sizes.train_steps or not np.isfinite(figures["last_loss"]):
            raise RuntimeError(f"the run ended at step {figures['steps']} with loss {figures['last_loss']}")
        return figures

    def signal_and_resume(self) -> dict:
        run = self.workdir / "train_sigterm"
        shutil.rmtree(run, ignore_errors=True)  # no earlier log for the wait below to see
        command = [sys.executable, *self.train_command(run, self.sizes.resume_steps, "bf16")]
        with open(self.log, "a", encoding="utf-8") as handle:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 900
            while logged_step(run) < self.sizes.signal_at:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"the run ended (exit {process.returncode}) before step {self.sizes.signal_at}")
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            stopped_code = process.wait(timeout=600)
        stopped = json.loads((run / "status.json").read_text())
        if stopped_code != EXIT_STOPPED or stopped["state"] != "stopped":
            raise RuntimeError(f"SIGTERM gave exit code {stopped_code}, status {stopped}")
        code, _, tail = self.python(*self.train_command(run, self.sizes.resume_steps, "bf16", "--resume", "auto"))
        status = json.loads((run / "status.json").read_text())
        steps = [json.loads(line)["step"] for line in (run / "logs/metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
        if code != 0 or status["state"] != "finished" or steps != list(range(1, self.sizes.resume_steps + 1)):
            raise RuntimeError(f"resume: exit code {code}, status {status.get('state')}, logged steps {steps[:3]}...{steps[-3:]}: {tail}")
        return {"stopped_at_step": stopped["step"], "exit_codes": f"{stopped_code} then {code}",
                "final_step": status["step"]}

    def train_prior(self) -> dict:
        run = self.workdir / "prior"
        code, seconds, tail = self.python("-m", "pipelines.train_prior", "--config", "configs/prior/cpu_tiny.yaml",
                                          "--data", str(self.data), "--output", str(run), "--overwrite",
                                          "--max-steps", str(self.sizes.prior_steps), "train.logging.progress_bar=false",
                                          "validation.max_images=2", "validation.noise_draws=2")
        if code != 0:
            raise RuntimeError(f"exit code {code}: {tail}")
        lines = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
        losses = [line for line in lines if "loss" in line]
        return {"steps": losses[-1]["step"], "last_loss": round(losses[-1]["loss"], 4), "wall_s": round(seconds, 1)}

    def cache_priors(self) -> dict:
        prior = self.workdir / "prior/model"
        source = str(prior) if prior.is_dir() else "tiny"  # the trained prior, or seeded random weights
        cache = self.workdir / "cache"
        arguments = ["-m", "pipelines.cache_priors", "--prior", source, "--data", str(self.data / "test"),
                     "--out", str(cache), "--steps", str(self.sizes.cache_steps), "--mode", "quarter"]
        shutil.rmtree(cache, ignore_errors=True)
        code, seconds, tail = self.python(*arguments)
        if code != 0:
            raise RuntimeError(f"exit code {code}: {tail}")
        verify, _, tail = self.python(*arguments, "--verify")
        if verify != 0:
            raise RuntimeError(f"--verify: exit code {verify}: {tail}")
        images = len(list((cache / "entries").rglob("*.safetensors")))
        return {"images": images, "wall_s": round(seconds, 1), "prior": "trained" if source != "tiny" else "tiny (random)"}

    def deblur(self, precision: str) -> dict:
        import torch

        from swintormer.core.image_io import read_image
        from swintormer.core.metrics import psnr
        from swintormer.pipeline import DeblurPipeline

        height, width = self.sizes.image
        blurry_path, sharp = self.synthetic_image()
        out = self.workdir / f"deblur_{precision}"
        code, seconds, tail = self.python("-m", "pipelines.deblur", str(blurry_path), "--output", str(out),
                                          "--device", self.device, "--precision", precision, "--no-progress")
        if code != 0:
            raise RuntimeError(f"exit code {code}: {tail}")
        restored = read_image(out / f"{blurry_path.stem}.png").pixels
        if restored.shape != (height, width, 3):
            raise RuntimeError(f"the output is {restored.shape}, the input {height}x{width}")
        megapixels = height * width / 1e6
        figures = {"command_wall_s": round(seconds, 1), "command_s_per_mp": round(seconds / megapixels, 2)}
        # In process: the same image, timed after a warm-up, with the peak device memory.
        pipe = DeblurPipeline.from_pretrained(device=self.device, precision=precision)
        blurry = read_image(blurry_path).pixels
        pipe(blurry[: self.sizes.crop, : self.sizes.crop])  # warm-up (kernels, allocator)
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = pipe(blurry)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        figures.update({"s_per_mp": round(elapsed / megapixels, 3),
                        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else "n/a",
                        "window_batch": pipe.window_batch,
                        "psnr_gain_db": round(psnr(np.clip(result, 0, 1), sharp) - psnr(blurry, sharp), 2)})
        return figures

    def synthetic_image(self) -> tuple[Path, np.ndarray]:
        """A blurry/sharp pair of the configured size (a bundled photo tiled and defocused), made once."""
        path = self.workdir / "image" / "blurry.png"
        sharp_path = self.workdir / "image" / "sharp.png"
        from swintormer.core.image_io import read_image, write_image

        if not path.is_file():
            from skimage import data

            from swintormer.core.data.synthetic_blur import blur_image, disc_kernel

            height, width = self.sizes.image
            photo = data.astronaut().astype(np.float32) / 255
            reps = (-(-height // photo.shape[0]), -(-width // photo.shape[1]), 1)
            sharp = np.tile(np.concatenate([photo, photo[::-1]], axis=0), reps)[:height, :width]
            sharp = np.ascontiguousarray(sharp)
            write_image(sharp_path, sharp)
            write_image(path, blur_image(sharp, disc_kernel(3.0)))  # within the shipped model's 1.5-6 px
        return path, read_image(sharp_path).pixels

    def overlapped_transfers(self) -> dict:
        import torch

        from swintormer.core.image_io import read_image
        from swintormer.inference import SlidingWindowInferencer
        from swintormer.pipeline import DeblurPipeline

        path, _ = self.synthetic_image()
        crop = read_image(path).pixels[: self.sizes.crop, : self.sizes.crop]
        model = DeblurPipeline.from_pretrained(device=self.device, fast_cpu=False).model
        overlapped = SlidingWindowInferencer(model, tile=128, stride=96, batch_size=4, progress=False)
        blocking = SlidingWindowInferencer(model, tile=128, stride=96, batch_size=4, progress=False)
        blocking.overlap_transfers = False
        a, b = overlapped(crop), blocking(crop)
        difference = float(np.abs(a - b).max())
        if difference != 0.0:
            raise RuntimeError(f"the overlapped path differs from the blocking one by up to {difference:.3g}")
        return {"overlapped": overlapped.overlap_transfers, "max_abs_difference": difference,
                "cuda": bool(torch.cuda.is_available())}

    def paper_forward(self, side_name: int, precision: str) -> dict:
        import torch

        from swintormer.models import Swintormer, SwintormerConfig

        side = self.sizes.forward_sides[side_name]
        torch.manual_seed(0)
        model = Swintormer(SwintormerConfig.preset("paper", in_channels=6)).eval().to(self.device)
        batch = torch.rand(1, 6, side, side, device=self.device)
        cuda = self.device.startswith("cuda")

        def forward() -> float:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device_type=torch.device(self.device).type,
                                                        dtype=torch.bfloat16, enabled=precision == "bf16"):
                output = model(batch)
            if cuda:
                torch.cuda.synchronize()
            if not torch.isfinite(output.float()).all():
                raise RuntimeError("non-finite output")
            return time.perf_counter() - start

        if cuda:
            forward()  # warm-up
            torch.cuda.reset_peak_memory_stats()
        times = [forward() for _ in range(self.sizes.forward_repeats)]
        return {"side": side, "median_ms": round(1000 * statistics.median(times), 1),
                "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else "n/a"}

    def run_all(self) -> None:
        self.make_data()
        self.record("train_swintormer bf16", lambda: self.train("bf16"))
        self.record("train_swintormer fp16", lambda: self.train("fp16"))
        self.record("train_swintormer SIGTERM + resume", self.signal_and_resume)
        self.record("train_prior", self.train_prior)
        self.record("cache_priors", self.cache_priors)
        self.record("deblur 4K fp32", lambda: self.deblur("fp32"))
        self.record("deblur 4K bf16", lambda: self.deblur("bf16"))
        self.record("overlapped transfers", self.overlapped_transfers)
        for precision in ("fp32", "bf16"):
            for side in (256, 512):
                self.record(f"paper forward {side}² {precision}", lambda s=side, p=precision: self.paper_forward(s, p))


def logged_step(run: Path) -> int:
    try:
        lines = (run / "logs/metrics.jsonl").read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def summary(row: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in row.items() if key not in ("check", "result", "seconds"))


def table(rows: list[dict]) -> str:
    lines = ["| check | result | seconds | figures |", "| --- | --- | --- | --- |"]
    lines += [f"| {row['check']} | {row['result']} | {row['seconds']} | {summary(row)} |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the dry run at tiny sizes")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available here; --device cpu runs the dry run", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_acceptance_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    acceptance = Acceptance(args.device, workdir)
    acceptance.run_all()
    print()
    print(table(acceptance.rows))
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else \
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    ok = all(row["result"] == "PASS" for row in acceptance.rows) and [r["check"] for r in acceptance.rows] == ROWS
    if args.json:
        args.json.write_text(json.dumps({"date": started, "device": args.device, "device_name": device_name,
                                         "torch": torch.__version__, "python": platform.python_version(),
                                         "dry_run": args.device == "cpu", "rows": acceptance.rows, "all_passed": ok},
                                        indent=2) + "\n")
    print("PASS" if ok else "FAIL", f"({device_name}; files and log in {workdir})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
