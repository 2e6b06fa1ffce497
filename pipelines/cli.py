"""The ``swintormer`` console script: one command with a subcommand per pipeline.

``swintormer deblur ...`` runs ``pipelines.deblur``, ``swintormer app`` ``pipelines.app``, ``swintormer train ...`` runs
``pipelines.train_swintormer``, ``swintormer recipe ...`` the whole two-stage chain (``pipelines.recipe``), and so on. Each pipeline module exposes ``main(argv) -> int``;
modules are imported only when their subcommand is used so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "deblur": ("pipelines.deblur", "deblur images with sliding-window inference"),
    "app": ("pipelines.app", "a local web page to deblur photos (drop, compare, download)"),
    "evaluate": ("pipelines.evaluate", "score restored images against targets (PSNR, SSIM, MAE, LPIPS)"),
    "train": ("pipelines.train_swintormer", "train the Swintormer network (stage two)"),
    "train-prior": ("pipelines.train_prior", "fine-tune the latent-diffusion prior (stage one)"),
    "cache-priors": ("pipelines.cache_priors", "sample and cache the prior of every image of a dataset"),
    "recipe": ("pipelines.recipe", "the whole chain: data, stage one, prior cache, stage two, evaluation"),
}


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: a clear message for anything but an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _usage() -> str:
    lines = ["usage: swintormer COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14}{text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'swintormer COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"swintormer: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
