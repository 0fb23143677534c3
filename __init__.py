"""bnserve: train, freeze, fold, export and serve Batch-Normalization networks."""

__version__ = "0.1.0"
