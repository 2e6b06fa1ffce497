"""Image-quality metrics of the DPDD defocus-deblurring protocol (Abuolaim & Brown,
ECCV 2020, as computed by the strongest published models on DPDD).

The protocol is the one published with the DPDD benchmark's strongest peers (Restormer's
``test_single_image_defocus_deblur.py`` and the papers that reuse it, Swintormer included):

* images are float arrays in [0, 1] (16-bit PNG samples divided by 65535, 8-bit by 255),
  H×W×3 RGB, restored output clipped to [0, 1];
* **PSNR** = ``10·log10(1 / MSE)`` with the MSE over all pixels and channels. Identical images
  have MSE 0; like the published script we report the cap :data:`PSNR_CAP_DB` = 100 dB for
  them (a finite number keeps means and JSON reports finite);
* **SSIM** = scikit-image's ``structural_similarity`` with ``data_range=1`` over the colour
  channels (``channel_axis=-1``: SSIM per channel, averaged), its default 7×7 uniform window;
* **MAE** = mean absolute error over all pixels and channels (the published script averages the
  per-channel MAEs, which is the same number for equal-sized channels);
* **LPIPS** (Zhang et al. 2018, v0.1) with the AlexNet trunk; inputs in [0, 1] are mapped to
  [-1, 1] (``normalize=True`` in the ``lpips`` package, as the DPDD scripts call it).

Per-image scores are averaged over the images (not over pixels) for the dataset figure.
PSNR, SSIM and MAE are computed in float64 from the float32 pixels; the published scripts
compute in float32, which differs by about 1e-7 dB PSNR and 5e-7 SSIM on a 512×341 image.

LPIPS needs two sets of weights: the linear calibration layers ship inside the ``lpips``
package; the AlexNet trunk is torchvision's ImageNet AlexNet, normally downloaded. Here it is
loaded only from a file given explicitly or from the local torch hub cache
(``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``); nothing is downloaded. When it is
missing, :class:`LPIPSMetric` raises :class:`LPIPSWeightsMissing` naming the paths it tried.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from skimage.metrics import structural_similarity

if TYPE_CHECKING:  # torch is imported where LPIPS needs it: PSNR/SSIM/MAE scoring starts without it
    import torch

PSNR_CAP_DB = 100.0
ALEXNET_CHECKPOINT_NAME = "alexnet-owt-7be5be79.pth"


def _check_pair(restored: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    restored = np.asarray(restored)
    target = np.asarray(target)
    if restored.shape != target.shape:
        raise ValueError(f"restored and target shapes differ: {restored.shape} vs {target.shape}")
    if restored.ndim != 3 or restored.shape[2] != 3:
        raise ValueError(f"expected H×W×3 images, got shape {restored.shape}")
    return restored, target


def psnr(restored: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB of float images in [0, 1]: ``10·log10(1 / MSE)``, MSE computed in float64
    over all pixels and channels; :data:`PSNR_CAP_DB` (100 dB) when the images are identical."""
    restored, target = _check_pair(restored, target)
    mse = float(np.mean((restored.astype(np.float64) - target.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return 10.0 * math.log10(1.0 / mse)


def ssim(restored: np.ndarray, target: np.ndarray) -> float:
    """SSIM of float H×W×3 images in [0, 1]: ``skimage.metrics.structural_similarity`` with
    ``data_range=1`` and ``channel_axis=-1`` (default 7×7 window, mean over channels)."""
    restored, target = _check_pair(restored, target)
    return float(
        structural_similarity(
            restored.astype(np.float64), target.astype(np.float64), data_range=1.0, channel_axis=-1
        )
    )


def mae(restored: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error of float images in [0, 1] over all pixels and channels."""
    restored, target = _check_pair(restored, target)
    return float(np.mean(np.abs(restored.astype(np.float64) - target.astype(np.float64))))


class LPIPSWeightsMissing(FileNotFoundError):
    """The AlexNet ImageNet weights LPIPS needs are not available locally."""


def default_alexnet_paths() -> list[Path]:
    """Where AlexNet weights are looked for when no path is given: the torch hub cache."""
    import torch

    return [Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT_NAME]


def find_alexnet_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The AlexNet weights file to use: ``path`` if given (must exist), else the torch hub cache.

    Raises :class:`LPIPSWeightsMissing` naming every path tried.
    """
    candidates = [Path(path)] if path is not None else default_alexnet_paths()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise LPIPSWeightsMissing(
        f"AlexNet weights for LPIPS not found (tried {tried}); copy torchvision's "
        f"{ALEXNET_CHECKPOINT_NAME} there or pass its path"
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # A file made elsewhere (torchvision's checkpoint): tensors only, no pickled code.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of AlexNet tensors")
    return state


class LPIPSMetric:
    """LPIPS v0.1 with the AlexNet trunk, weights from local files only.

    ``alexnet_weights``: torchvision AlexNet state dict (``features.N.weight`` keys; ``.pth`` or
    ``.safetensors``); ``None`` looks in the torch hub cache. The linear layers come from the
    ``lpips`` package. ``__call__(restored, target)`` takes float H×W×3 arrays in [0, 1] and
    returns the distance as a float.
    """

    def __init__(self, alexnet_weights: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"):
        self.weights_path = find_alexnet_weights(alexnet_weights)
        import lpips  # after the weights check: importing it (and torchvision) takes seconds
        import torch

        self.device = torch.device(device)
        with warnings.catch_warnings():
            # torchvision deprecation noise from the lpips package's ``pretrained=`` argument.
            warnings.simplefilter("ignore")
            # pnet_rand=True: build the trunk without torchvision's download; we load it below.
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        state = _load_state_dict(self.weights_path)
        trunk = {}
        for name, tensor in state.items():
            if not name.startswith("features."):
                continue
            index = int(name.split(".")[1])
            slice_number = 1 + sum(index >= start for start in (2, 5, 8, 10))
            trunk[f"slice{slice_number}.{name.split('.', 1)[1]}"] = tensor
        expected = set(model.net.state_dict().keys())
        missing = expected - set(trunk)
        if missing:
            raise ValueError(
                f"{self.weights_path}: not a torchvision AlexNet state dict (missing {sorted(missing)[:3]}...)"
            )
        model.net.load_state_dict(trunk, strict=True)
        self.model = model.to(self.device).eval()

    def __call__(self, restored: np.ndarray, target: np.ndarray) -> float:
        import torch

        restored, target = _check_pair(restored, target)

        def to_tensor(image: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None].to(self.device)

        with torch.no_grad():
            distance = self.model(to_tensor(restored), to_tensor(target), normalize=True)
        return float(distance.reshape(-1)[0].item())
