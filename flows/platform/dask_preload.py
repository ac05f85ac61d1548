"""Preloaded by the platform's Dask workers (``dask worker --preload``): import what their tasks need once, at start.

A worker otherwise imports pandas, pyarrow, s3fs, PyTorch and aeflow's preprocessing
and application modules when it unpickles its first task (preprocessing partitions,
then each application's apply shards), which makes the first run after
``aeflow platform up`` many seconds slower on a busy machine.
"""

import dask.dataframe  # noqa: F401
import pyarrow.parquet  # noqa: F401
import s3fs  # noqa: F401

import tasks.load
import tasks.preprocess  # noqa: F401
from tasks.apps import load_all

load_all()
