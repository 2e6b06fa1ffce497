"""Deblur the shipped sample photo with the shipped model and print the PSNR gain (README's first command).

    python tools/demo.py [--output demo_output] [--model swintormer/weights/default]

Runs the deblurring pipeline (:class:`swintormer.pipeline.DeblurPipeline`, what the deblur
command runs, with its default settings) on ``samples/coffee_04_blurry.png``, a
held-out synthetic defocus image (see ``samples/README.md``), writes the result to
``demo_output/coffee_04_blurry.png`` and prints the PSNR of the blurry input and of the result
against the sample's sharp original ``samples/coffee_04_sharp.png``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SAMPLES_DIR = REPO_ROOT / "samples"
BLURRY_SAMPLE = SAMPLES_DIR / "coffee_04_blurry.png"
SHARP_SAMPLE = SAMPLES_DIR / "coffee_04_sharp.png"
DEFAULT_MODEL_DIR = REPO_ROOT / "swintormer" / "weights" / "default"


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured: where the result is and the PSNRs (dB) against the sharp original."""

    output_path: Path
    blurry_psnr: float
    restored_psnr: float


class DemoError(Exception):
    """The demo could not run (missing sample or the deblur command failed); the message says why."""


def run_demo(output_dir: Path, model_dir: Path = DEFAULT_MODEL_DIR, progress: bool = True) -> DemoResult:
    """Deblur the blurry sample into ``output_dir`` with the deblur pipeline and score it."""
    from swintormer.core.image_io import read_image, write_image
    from swintormer.core.metrics import psnr
    from swintormer.pipeline import DeblurPipeline

    for sample in (BLURRY_SAMPLE, SHARP_SAMPLE):
        if not sample.is_file():
            raise DemoError(f"sample image missing: {sample}")
    try:
        # The pipeline's own defaults (tile, stride, blend): the demo shows what users get.
        pipe = DeblurPipeline.from_pretrained(model_dir)
    except (FileNotFoundError, ValueError) as error:
        raise DemoError(str(error)) from None
    pipe.progress = progress
    blurry_image = read_image(BLURRY_SAMPLE)
    output_path = write_image(output_dir / f"{BLURRY_SAMPLE.stem}.png", pipe(blurry_image.pixels),
                              bit_depth=blurry_image.bit_depth)
    sharp = read_image(SHARP_SAMPLE).pixels
    blurry = blurry_image.pixels
    restored = read_image(output_path).pixels
    return DemoResult(output_path=output_path, blurry_psnr=psnr(blurry, sharp), restored_psnr=psnr(restored, sharp))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demo",
        description="Deblur the shipped sample (samples/coffee_04_blurry.png, a held-out synthetic defocus "
                    "image) with the shipped model through the deblur command, write the result, and print "
                    "the PSNR of the blurry input and of the result against the sample's sharp original.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=Path("demo_output"), help="folder for the result")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR,
                        help="model folder (config.json + model.safetensors)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_demo(args.output, args.model, progress=not args.no_progress)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {result.output_path}")
    print(f"PSNR blurry input: {result.blurry_psnr:.2f} dB")
    print(f"PSNR deblurred:    {result.restored_psnr:.2f} dB  ({result.restored_psnr - result.blurry_psnr:+.2f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
