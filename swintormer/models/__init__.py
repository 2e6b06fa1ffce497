"""Network definitions: the Swintormer U-Net and its block families."""

from swintormer.models.swintormer import Swintormer, SwintormerConfig

__all__ = ["Swintormer", "SwintormerConfig"]
