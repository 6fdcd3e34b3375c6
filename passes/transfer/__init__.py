"""Attention transfer: fit the learnable parameters of a softmax replacement, site by
site, to the original model's softmax outputs on calibration data, then write them into the rewritten graph.

Public API: :func:`transfer` (orchestration, checkpoint/resume), :func:`load_calibration` /
:class:`Calibration` / :class:`CalibrationDataError` (calibration data), :func:`stdlib_corpus` (offline text
corpus), :func:`load_checkpoint_params` / :func:`site_params` (reuse fitted params), and
``passes.transfer.cli.add_commands`` (the ``softswap transfer`` subcommand).
"""
from __future__ import annotations

from .corpus import Corpus, stdlib_corpus
from .data import Calibration, CalibrationDataError, load_calibration
from .fit import FitConfig
from .transfer import (TransferError, fit_params, load_checkpoint_params, rewrite_with_params, site_params,
                       transfer, transfer_options)

__all__ = ["transfer", "fit_params", "transfer_options", "load_calibration", "Calibration", "CalibrationDataError",
           "stdlib_corpus", "Corpus", "FitConfig", "TransferError", "load_checkpoint_params", "site_params",
           "rewrite_with_params"]
