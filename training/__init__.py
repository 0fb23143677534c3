"""Train BN networks in PyTorch, check their moving statistics, fold BN, export to ONNX.

Needs the `train` extra (torch); the server never imports this package.
"""

from .export import ExportError, ExportReport, export_onnx
from .fold import FoldError, fold_batchnorm
from .stats import StatisticsError, check_running_stats, recalibrate

__all__ = [
    "ExportError",
    "ExportReport",
    "FoldError",
    "StatisticsError",
    "check_running_stats",
    "export_onnx",
    "fold_batchnorm",
    "recalibrate",
]
