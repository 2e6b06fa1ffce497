#!/usr/bin/env python
"""Convert a checkpoint trained with the authors' Swintormer code into a model folder.

    python tools/convert_reference_checkpoint.py WEIGHTS --config CONFIG.json --output DIR

WEIGHTS: ``.safetensors``, or ``.pth``/``.pt`` holding a raw state dict or one wrapped in
``params`` / ``params_ema`` (read with ``torch.load(weights_only=True)``). CONFIG.json: the
authors' constructor arguments (``inp_channels``, ``dim``, ``num_blocks``, …). DIR: a folder
loadable with ``Swintormer.from_pretrained`` (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from swintormer.models.reference_checkpoint import convert_reference_checkpoint, read_reference_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="checkpoint made with the authors' code")
    parser.add_argument("--config", type=Path, required=True, help="JSON file of the authors' constructor arguments")
    parser.add_argument("--output", type=Path, required=True, help="model folder to write")
    parser.add_argument(
        "--key", choices=("params", "params_ema"), default=None,
        help="which wrapped state dict to take (default: params_ema if present, else params)",
    )
    args = parser.parse_args(argv)
    try:
        model = convert_reference_checkpoint(args.weights, read_reference_arguments(args.config), key=args.key)
        model.save_pretrained(args.output)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output} ({params:,} parameters, config {model.config.to_dict()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
