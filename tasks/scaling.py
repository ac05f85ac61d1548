"""Scaling statistics from mergeable per-partition moments (Chan et al.'s parallel variance).

Every preprocessed partition is summarised on its Dask worker
(:func:`partition_moments`); the client merges the summaries exactly
(:func:`merge_moments`) into :class:`ScalingStats`, the affine map applied when
partitions are read back. Pure numpy/pandas, tested without Prefect or Dask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd

EXTREME_SCALED = 1e12
"""A value scaled beyond this (its squared error ~1e24 and up; float32 overflows at 3.4e38) is refused at fit time."""

SPLIT_COL = "__aeflow_val"
"""The boolean column of a preprocessed partition that flags validation rows."""


def partition_moments(df: pd.DataFrame, columns: list[str]) -> dict[str, np.ndarray | int]:
    """Mergeable per-column moments of the training rows, plus row counts."""
    train = df[~df[SPLIT_COL]] if SPLIT_COL in df.columns else df
    x = train[columns].to_numpy(dtype="float64", na_value=np.nan)
    ok = ~np.isnan(x)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(ok, x, 0.0).sum(axis=0)
        mean = np.where(n > 0, total / np.maximum(n, 1), 0.0)
        m2 = np.where(ok, (x - mean) ** 2, 0.0).sum(axis=0)
    big = np.finfo("float64").max
    return {
        "n": n.astype("int64"),
        "mean": mean,
        "m2": m2,
        "min": np.where(ok, x, big).min(axis=0, initial=big),
        "max": np.where(ok, x, -big).max(axis=0, initial=-big),
        "nonnull_all": df[columns].notna().to_numpy().sum(axis=0).astype("int64"),
        # every row's extremes (validation rows too): a value far outside the training rows' scale
        "lo_all": np.nanmin(np.where(np.isnan(xa := df[columns].to_numpy(dtype="float64", na_value=np.nan)), big, xa),
                            axis=0, initial=big),
        "hi_all": np.nanmax(np.where(np.isnan(xa), -big, xa), axis=0, initial=-big),
        "rows": len(df),
        "val_rows": int(df[SPLIT_COL].sum()) if SPLIT_COL in df.columns else 0,
    }


def merge_moments(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Chan et al.'s pairwise merge: exact mean and variance from partition moments."""
    acc = None
    for p in parts:
        if acc is None:
            acc = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
            continue
        n_a, n_b = acc["n"], p["n"]
        n = n_a + n_b
        delta = p["mean"] - acc["mean"]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(n > 0, n_b / np.maximum(n, 1), 0.0)
        acc["mean"] = acc["mean"] + delta * frac
        acc["m2"] = acc["m2"] + p["m2"] + delta**2 * n_a * frac
        acc["n"] = n
        acc["min"] = np.minimum(acc["min"], p["min"])
        acc["max"] = np.maximum(acc["max"], p["max"])
        acc["nonnull_all"] = acc["nonnull_all"] + p["nonnull_all"]
        if "lo_all" in acc:
            acc["lo_all"] = np.minimum(acc["lo_all"], p["lo_all"])
            acc["hi_all"] = np.maximum(acc["hi_all"], p["hi_all"])
        acc["rows"] += p["rows"]
        acc["val_rows"] += p["val_rows"]
        for col, (count, examples) in p.get("unseen", {}).items():
            have = acc.setdefault("unseen", {}).setdefault(col, [0, []])
            have[0] += count
            have[1] = sorted(set(have[1]) | set(examples))[:3]
    if acc is None:
        raise ValueError("no partitions")
    return acc


@dataclass(frozen=True)
class ScalingStats:
    """Per-column statistics of the training rows and the affine map they define."""

    columns: tuple[str, ...]
    scaler: str
    count: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]
    onehot: tuple[bool, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_moments(cls, columns: list[str], mom: dict[str, Any], scaler: str, onehot: list[bool]) -> ScalingStats:
        n = mom["n"]
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(np.where(n > 1, mom["m2"] / np.maximum(n - 1, 1), 0.0))
        mn = np.where(n > 0, mom["min"], 0.0)
        mx = np.where(n > 0, mom["max"], 0.0)
        return cls(
            tuple(columns),
            scaler,
            tuple(int(v) for v in n),
            tuple(float(v) for v in mom["mean"]),
            tuple(float(v) for v in std),
            tuple(float(v) for v in mn),
            tuple(float(v) for v in mx),
            tuple(onehot),
        )

    def offset_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``x_scaled = (x - offset) / scale``; one-hot columns and constant columns pass through."""
        offset, scale = self.offset_scale64()
        return offset.astype("float32"), scale.astype("float32")

    def extremes(self, lo: np.ndarray, hi: np.ndarray, limit: float = EXTREME_SCALED) -> list[tuple[str, float, float]]:
        """``(column, value, scaled value)`` of each column whose most extreme value (of ``lo``/``hi``: every
        row's minimum and maximum) scales beyond ``limit``: its squared error would overflow float32 training."""
        offset, scale = self.offset_scale64()
        out = []
        none = np.finfo("float64").max  # the moments' placeholder of a column without a value (all null)
        for i, name in enumerate(self.columns):
            for v in (lo[i], hi[i]):
                z = (float(v) - offset[i]) / scale[i]
                if np.isfinite(v) and abs(v) < none and abs(z) > limit:
                    out.append((name, float(v), float(z)))
                    break
        return out

    def offset_scale64(self) -> tuple[np.ndarray, np.ndarray]:
        k = len(self.columns)
        if self.scaler == "none":
            return np.zeros(k), np.ones(k)
        if self.scaler == "standard":
            offset, scale = np.array(self.mean), np.array(self.std)
        else:
            offset, scale = np.array(self.min), np.array(self.max) - np.array(self.min)
        scale = np.where(scale > 1e-12, scale, 1.0)
        oh = np.array(self.onehot or [False] * k, dtype=bool)
        offset = np.where(oh, 0.0, offset)
        scale = np.where(oh, 1.0, scale)
        return offset.astype("float64"), scale.astype("float64")

    def transform(self, x: np.ndarray) -> np.ndarray:
        offset, scale = self.offset_scale()
        return ((x - offset) / scale).astype("float32", copy=False)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        offset, scale = self.offset_scale()
        return (x * scale + offset).astype("float64", copy=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScalingStats:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def scale(ddf: dd.DataFrame, stats: ScalingStats) -> dd.DataFrame:
    """``ddf -> ddf``: apply the scaling to the encoded feature columns."""
    cols = list(stats.columns)

    def _scale(df: pd.DataFrame) -> pd.DataFrame:
        out = df.copy()
        out[cols] = stats.transform(df[cols].to_numpy(dtype="float32"))
        return out

    return ddf.map_partitions(_scale, meta=ddf._meta)
