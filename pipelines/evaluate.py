"""Score restored images against their targets with the DPDD protocol (PSNR, SSIM, MAE, LPIPS).

    python -m pipelines.evaluate --restored OUT/ --target DPDD/test/target --report scores.json
    swintormer evaluate --restored OUT/ --target DPDD/test --report scores.json

Restored and target files are matched by file stem. The metrics are those of
:mod:`swintormer.core.metrics` (per image, then averaged over images). The report is JSON with a
``per_image`` list, a ``mean`` object (``psnr``, ``ssim``, ``mae`` and ``lpips`` when it could be
computed), optional ``groups`` (DPDD's indoor/outdoor split), and everything that went wrong.

DPDD indoor/outdoor labels: ``indoor_labels.npy`` / ``outdoor_labels.npy`` hold **1-based**
indices into the naturally sorted list of the test targets (the convention of the scripts that
publish DPDD numbers). They are looked for in the ``--target`` folder and its parent, or given
with ``--labels-dir``.

SSIM uses a 7×7 window (scikit-image's default, the published protocol); an image pair smaller
than 7 pixels on a side has no SSIM: its ``ssim`` is ``null`` in the report, it is listed under
``ssim_unavailable``, and the mean SSIM is taken over the other images (``ssim_count`` says how
many). Its PSNR and MAE are scored as usual.

The ``--report`` path is checked before anything is scored: its folder is created and a file is
created in it and removed, so an unwritable report fails at once (exit status 2).

Exit status: 0 when every target was scored; 1 when some file could not be read, a pair had
different sizes or a target had no restored image (those are listed, the rest is still scored
and reported); 2 for usage errors (missing folder, nothing to score).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from swintormer.core.files import atomic_write_bytes
from swintormer.core.image_io import ImageReadError, list_images, read_image
from swintormer.core.metrics import PSNR_CAP_DB, LPIPSMetric, LPIPSWeightsMissing, mae, psnr, ssim

METRIC_NAMES = ("psnr", "ssim", "mae", "lpips")
SSIM_WINDOW = 7  # skimage.metrics.structural_similarity's default win_size
LABEL_FILES = {"indoor": "indoor_labels.npy", "outdoor": "outdoor_labels.npy"}


class UsageError(Exception):
    """A user error: printed as ``error: ...`` with exit status 2."""


def natural_key(path: Path) -> list:
    """Sort key that orders digit runs numerically (``img2`` before ``img10``), like ``natsort``'s
    default (case-sensitive) order used by the DPDD evaluation scripts."""
    # re.split with a capturing group alternates text and digits, so positions never mix types
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


@dataclass
class EvaluationResult:
    per_image: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    missing_restored: list[str] = field(default_factory=list)
    unmatched_restored: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    lpips_note: str | None = None

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.missing_restored)

    def means(self, names: list[str] | None = None) -> dict[str, float]:
        rows = self.per_image if names is None else [row for row in self.per_image if row["name"] in set(names)]
        result: dict[str, float] = {}
        for metric in METRIC_NAMES:
            values = [row[metric] for row in rows if row.get(metric) is not None]
            if metric == "ssim":  # images below SSIM's window have none: the mean is over the others
                if values:
                    result[metric] = float(np.mean(values))
            elif values and len(values) == len(rows):
                result[metric] = float(np.mean(values))
        return result

    @property
    def ssim_unavailable(self) -> list[str]:
        return [row["name"] for row in self.per_image if row.get("ssim") is None]


def resolve_target_folder(target: Path) -> Path:
    """``target`` itself, or its ``target`` sub-folder when given a dataset split folder."""
    if not target.is_dir():
        raise UsageError(f"target folder not found: {target}")
    if not list_images(target) and (target / "target").is_dir():
        return target / "target"
    return target


def load_group_labels(label_dir: Path, targets_sorted: list[Path]) -> dict[str, list[str]]:
    """Group name → target stems, from DPDD's 1-based label files in ``label_dir``."""
    groups: dict[str, list[str]] = {}
    for group, file_name in LABEL_FILES.items():
        label_path = label_dir / file_name
        if not label_path.is_file():
            continue
        try:
            indices = np.asarray(np.load(label_path, allow_pickle=False)).reshape(-1).astype(np.int64)
        except Exception as exc:
            raise UsageError(f"{label_path}: cannot read label file ({exc})") from None
        if indices.size and (indices.min() < 1 or indices.max() > len(targets_sorted)):
            raise UsageError(
                f"{label_path}: indices must be 1-based within the {len(targets_sorted)} targets, "
                f"found {indices.min()}..{indices.max()}"
            )
        groups[group] = [targets_sorted[index - 1].stem for index in indices]
    return groups


def find_label_dir(target_dir: Path) -> Path | None:
    for candidate in (target_dir, target_dir.parent):
        if any((candidate / name).is_file() for name in LABEL_FILES.values()):
            return candidate
    return None


def evaluate_folders(
    restored_dir: Path,
    target_dir: Path,
    lpips_metric: LPIPSMetric | None = None,
    label_dir: Path | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Match restored and target images by stem and score every pair (see the module docstring)."""
    if not restored_dir.is_dir():
        raise UsageError(f"restored folder not found: {restored_dir}")
    target_dir = resolve_target_folder(target_dir)
    targets = sorted(list_images(target_dir), key=natural_key)
    restored_files = list_images(restored_dir)
    if not targets:
        raise UsageError(f"no images in target folder {target_dir}")
    result = EvaluationResult()
    restored_by_stem: dict[str, Path] = {}
    for path in restored_files:
        if path.stem in restored_by_stem:
            result.errors.append(f"{path}: another restored file has the stem {path.stem!r} ({restored_by_stem[path.stem].name})")
            continue
        restored_by_stem[path.stem] = path
    target_stems = {path.stem for path in targets}
    result.unmatched_restored = [str(path) for stem, path in sorted(restored_by_stem.items()) if stem not in target_stems]

    if label_dir is not None:
        result.groups = load_group_labels(label_dir, targets)

    for target_path in tqdm(targets, desc="evaluate", unit="image", disable=not progress):
        restored_path = restored_by_stem.get(target_path.stem)
        if restored_path is None:
            result.missing_restored.append(str(target_path))
            continue
        try:
            restored_image = read_image(restored_path).pixels
            target_image = read_image(target_path).pixels
        except ImageReadError as exc:
            result.errors.append(str(exc))
            continue
        if restored_image.shape != target_image.shape:
            result.errors.append(
                f"{restored_path}: size {restored_image.shape[1]}×{restored_image.shape[0]} differs from target "
                f"{target_path} {target_image.shape[1]}×{target_image.shape[0]}"
            )
            continue
        row = {
            "name": target_path.stem,
            "restored": str(restored_path),
            "target": str(target_path),
            "psnr": psnr(restored_image, target_image),
            # None below SSIM's window (module docstring)
            "ssim": ssim(restored_image, target_image) if min(target_image.shape[:2]) >= SSIM_WINDOW else None,
            "mae": mae(restored_image, target_image),
        }
        if lpips_metric is not None:
            try:
                row["lpips"] = lpips_metric(restored_image, target_image)
            except RuntimeError as exc:  # AlexNet's pooling needs images of at least ~32 px
                result.errors.append(f"{restored_path}: LPIPS failed ({str(exc).splitlines()[0]})")
        for group, stems in result.groups.items():
            if target_path.stem in stems:
                row["group"] = group
        result.per_image.append(row)
    return result


def build_report(result: EvaluationResult, restored_dir: Path, target_dir: Path) -> dict:
    report = {
        "restored_dir": str(restored_dir),
        "target_dir": str(target_dir),
        "protocol": {
            "psnr": f"10*log10(1/MSE) on [0,1] floats; identical images reported as {PSNR_CAP_DB}",
            "ssim": "skimage.metrics.structural_similarity, data_range=1, channel_axis=-1; null for images "
                    f"smaller than its {SSIM_WINDOW}x{SSIM_WINDOW} window, the mean taken over the others",
            "mae": "mean absolute error on [0,1] floats",
            "lpips": "LPIPS v0.1 AlexNet, inputs [0,1] mapped to [-1,1]",
        },
        "count": len(result.per_image),
        "mean": result.means(),
        "ssim_count": len(result.per_image) - len(result.ssim_unavailable),
        "ssim_unavailable": result.ssim_unavailable,
        "per_image": result.per_image,
        "errors": result.errors,
        "missing_restored": result.missing_restored,
        "unmatched_restored": result.unmatched_restored,
        "lpips_unavailable": result.lpips_note,
    }
    if result.groups:
        report["groups"] = {
            group: {"count": sum(1 for row in result.per_image if row["name"] in set(stems)), **result.means(stems)}
            for group, stems in result.groups.items()
        }
    return report


def format_table(report: dict) -> str:
    rows = [("all", report["count"], report["mean"])]
    for group, values in report.get("groups", {}).items():
        rows.append((group, values["count"], values))
    header = f"{'images':<10}{'count':>6}{'PSNR':>10}{'SSIM':>9}{'MAE':>9}{'LPIPS':>9}"
    lines = [header, "-" * len(header)]

    def cell(values: dict, key: str, width: int, digits: int) -> str:
        value = values.get(key)
        return f"{value:>{width}.{digits}f}" if value is not None and math.isfinite(value) else f"{'-':>{width}}"

    for label, count, values in rows:
        lines.append(
            f"{label:<10}{count:>6}{cell(values, 'psnr', 10, 3)}{cell(values, 'ssim', 9, 4)}"
            f"{cell(values, 'mae', 9, 4)}{cell(values, 'lpips', 9, 4)}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swintormer evaluate",
        description=(
            "Score restored images against sharp targets, matched by file stem, with the DPDD "
            "protocol: PSNR (10*log10(1/MSE) on [0,1]), SSIM (scikit-image, data_range 1, over "
            "colour channels), MAE and LPIPS (AlexNet). Prints a table and writes a JSON report. "
            "Images smaller than SSIM's 7x7 window get no SSIM (null; the mean is over the others). "
            "Exit status 1 when some file could not be scored (it is listed; the rest is scored)."
        ),
    )
    parser.add_argument("--restored", type=Path, required=True, help="folder of restored images")
    parser.add_argument(
        "--target", type=Path, required=True,
        help="folder of sharp targets, or a dataset split folder holding a 'target' sub-folder",
    )
    parser.add_argument("--report", type=Path, default=None,
                        help="write the JSON report here (atomically; checked writable before scoring)")
    parser.add_argument(
        "--lpips-alexnet", type=Path, default=None,
        help="torchvision AlexNet ImageNet weights (.pth or .safetensors) for LPIPS; default: the "
        "torch hub cache ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth). Nothing is downloaded.",
    )
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    parser.add_argument(
        "--labels-dir", type=Path, default=None,
        help="folder with DPDD's indoor_labels.npy / outdoor_labels.npy (default: looked for in the "
        "target folder and its parent)",
    )
    parser.add_argument("--device", default=None, help="torch device for LPIPS (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_report_writable(report: Path) -> None:
    """Create the report's folder and prove a file can be created in it (before any scoring)."""
    if report.is_dir():
        raise UsageError(f"--report {report} is a folder; give a file name")
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=report.parent):
            pass
    except OSError as error:
        raise UsageError(f"cannot write the report {report} ({error.strerror or error})") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.report is not None:
            check_report_writable(args.report)
        target_dir = resolve_target_folder(args.target)
        lpips_metric = None
        lpips_note = None
        if args.no_lpips:
            lpips_note = "disabled with --no-lpips"
        else:
            try:
                import torch

                device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
                lpips_metric = LPIPSMetric(args.lpips_alexnet, device=device)
            except (LPIPSWeightsMissing, ValueError) as exc:
                lpips_note = str(exc)
                print(f"warning: LPIPS skipped: {exc}", file=sys.stderr)
            except (RuntimeError, AssertionError) as exc:  # an unknown or unavailable device
                raise UsageError(f"cannot run LPIPS on device {device!r}: {str(exc).splitlines()[0]}") from None
        if args.labels_dir is not None and not args.labels_dir.is_dir():
            raise UsageError(f"labels folder not found: {args.labels_dir}")
        label_dir = args.labels_dir if args.labels_dir is not None else find_label_dir(target_dir)
        result = evaluate_folders(args.restored, target_dir, lpips_metric, label_dir, progress=not args.quiet)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.lpips_note = lpips_note
    report = build_report(result, args.restored, target_dir)

    for message in result.errors:
        print(f"error: {message}", file=sys.stderr)
    for path in result.missing_restored:
        print(f"error: {path}: no restored image with this stem in {args.restored}", file=sys.stderr)
    for path in result.unmatched_restored:
        print(f"warning: {path}: no target with this stem, not scored", file=sys.stderr)
    print(format_table(report))
    if args.report is not None:
        atomic_write_bytes(args.report, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
        print(f"report written to {args.report}")
    if not result.per_image:
        print("error: no image could be scored", file=sys.stderr)
        return 2 if not result.errors else 1
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
