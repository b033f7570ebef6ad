"""The run folder's format now lives in `tbdiag.runfolder` (reports read it without importing training
code); these names stay importable from here for existing callers."""

from __future__ import annotations

from tbdiag.runfolder import (TrainConfig, load_last, read_config, read_metrics, save_best, save_checkpoint,
                              write_config, write_metrics)

__all__ = ["TrainConfig", "load_last", "read_config", "read_metrics", "save_best", "save_checkpoint", "write_config",
           "write_metrics"]
