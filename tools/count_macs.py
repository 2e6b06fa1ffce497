#!/usr/bin/env python
"""Parameters and multiply-accumulates (MACs) of one Swintormer forward pass.

    python tools/count_macs.py --config paper --size 256 256
    python tools/count_macs.py --config path/to/model_folder_or_config.json --size 1120 1680 --json out.json

``--config`` is a preset name (``paper``, ``small``, ``tiny``, …), a model folder, or a
``config.json``. The model is built on PyTorch's ``meta`` device, so nothing is computed and any
size is counted at once. Sizes that are not a multiple of ``16·window`` are counted as the
network runs them: reflect-padded. Matrix products and convolutions are counted; element-wise
work is not (see ``swintormer/models/complexity.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from swintormer.core.files import atomic_write_bytes
from swintormer.models import Swintormer, SwintormerConfig
from swintormer.models.complexity import count_macs
from swintormer.models.swintormer import CONFIG_NAME, load_config_file


def resolve_config(spec: str) -> SwintormerConfig:
    """A preset name, a model folder or a config.json → config."""
    path = Path(spec)
    if path.is_dir():
        path = path / CONFIG_NAME
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return load_config_file(path)
    return SwintormerConfig.preset(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="paper", help="preset name, model folder or config.json (default: paper)")
    parser.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"), help="input height and width")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    height, width = args.size
    if height < 1 or width < 1 or args.batch < 1:
        print("error: --size and --batch must be positive", file=sys.stderr)
        return 2
    try:
        config = resolve_config(args.config)
    except (KeyError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    with torch.device("meta"):
        model = Swintormer(config).eval()
        result = count_macs(model, torch.empty(args.batch, config.in_channels, height, width))
    params = sum(p.numel() for p in model.parameters())
    report = {
        "config": config.to_dict(),
        "input": [args.batch, config.in_channels, height, width],
        "parameters": params,
        "macs": result.total,
        "gmacs": result.gmacs,
        "gmacs_by_stage": {k: v / 1e9 for k, v in result.by_stage.items()},
    }
    print(f"config       {args.config}")
    print(f"input        {args.batch}×{config.in_channels}×{height}×{width}")
    print(f"parameters   {params:,} ({params / 1e6:.2f} M)")
    print(f"GMACs        {result.gmacs:.2f}")
    for stage, macs in result.by_stage.items():
        print(f"  {stage:<20}{macs / 1e9:9.3f}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
