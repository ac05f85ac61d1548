"""Data kinds: how an application's data is inspected and loaded (tables or images).

An :class:`~tasks.apps.base.Application` names its kind (``data = TABLES`` or
``data = IMAGES``); the pipeline asks the kind to

1. ``inspect`` the inputs at the door (list, hash, read headers, infer or check the
   schema) before anything is written — the roles are ``input`` (training data),
   ``apply_to`` (data the model is applied to) and, for images, ``reference``;
2. ``load`` them in the run on the Dask client (tables: validate, split, encode and scale
   into Parquet partitions; images: decode, validate and normalise into shards) and build
   the stages' context (:class:`TableContext` or :class:`ImageContext`).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from tasks.apps.base import Application, Context, Fitted
from tasks.config import RunConfig
from tasks.errors import ConfigError
from tasks.storage import FileRecord, RunDir

Inputs = dict[str, Any]
"""Inspected inputs by role (``input``, ``apply_to``, ``reference``): ``TableSource`` or ``ImageSource``."""


def data_roles(config: RunConfig, fitted: Fitted | None, what: str = "data") -> dict[str, str]:
    """Which URIs play which role: with ``--model`` the data is applied to (``apply_to``, or the
    input when only ``--input`` is given); otherwise ``input`` trains and ``apply_to`` is optional."""
    load = config.load
    if fitted is not None:
        target = load.apply_to or load.input
        if not target:
            raise ConfigError(f"--model needs {what} to apply it to: pass --apply-to (or --input)")
        return {"apply_to": target}
    if not load.input:
        raise ConfigError("--input is required (or --model RUN to reuse a trained model)")
    return {"input": load.input, **({"apply_to": load.apply_to} if load.apply_to else {})}


class DataKind(ABC):
    """How one kind of data gets from its URIs into a stage context."""

    name: ClassVar[str]
    load_stage: ClassVar[str]  # the name of the load stage in the manifest's timings
    # `aeflow run` common options that mean something for this kind (None: all), and their help texts.
    common_options: ClassVar[tuple[str, ...] | None] = None
    option_help: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def inspect(self, app: Application, config: RunConfig, fitted: Fitted | None) -> Inputs:
        """Look at every input before any work; raise :class:`~tasks.errors.InputError` on bad data."""

    @abstractmethod
    def load(self, app: Application, config: RunConfig, run: RunDir, inputs: Inputs, fitted: Fitted | None,
             device: torch.device) -> Context:
        """Load the inspected inputs into the run (inside a Dask client) and build the context."""

    def fitted_extras(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {}

    def manifest_extra(self, ctx: Context) -> dict[str, Any]:
        return {}

    @staticmethod
    def records(inputs: Inputs) -> dict[str, list[FileRecord]]:
        """Every input file with its size and hash, by role (the manifest's ``inputs``)."""
        return {role: list(src.files) for role, src in inputs.items()}

    @staticmethod
    def hashes(inputs: Inputs) -> dict[str, list[str]]:
        return {role: [f.hash for f in src.files] for role, src in inputs.items()}


# ---------------------------------------------------------------------------------------
# Tables


@dataclass
class TableContext(Context):
    """The stages' context for tables: the schema and the prepared (preprocessed) data."""

    schema: Any = None
    train: Any = None  # PreparedTable of the training input (None when a model is reused)
    target: Any = None  # PreparedTable the model is applied to (the training input itself by default)
    source: Any = None  # the inspected TableSource that ``target`` came from (impute reads raw values)

    @cached_property
    def train_arrays(self) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
        """(train_x, val_x, train_side, val_side), scaled, read once — every training row in memory:
        for fits that need them all (detect's references, impute's head); the others stream."""
        from tasks.preprocess import read_prepared
        from tasks.scaling import SPLIT_COL

        assert self.train is not None
        x, side = read_prepared(self.train)
        val = side[SPLIT_COL].to_numpy() if SPLIT_COL in side.columns else np.zeros(len(x), bool)
        return x[~val], x[val], side[~val].reset_index(drop=True), side[val].reset_index(drop=True)

    @cached_property
    def target_arrays(self) -> tuple[np.ndarray, pd.DataFrame]:
        """(x, side) of the data the model is applied to, in input order, scaled — all of it in memory;
        prefer :meth:`parts` or :meth:`sample`."""
        from tasks.preprocess import read_prepared

        return read_prepared(self.target)

    def _table(self, which: str) -> Any:
        prep = self.train if which == "train" else self.target
        if prep is None:
            raise ValueError(f"no {which} data in this run")
        return prep

    def parts(self, which: str = "target", split: str = "all") -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
        """Scaled partitions of the training input (``which="train"``) or the applied data, one at a time
        (bounded memory); ``split`` keeps ``"train"`` or ``"val"`` rows only."""
        from tasks.apps.tabular import read_part
        from tasks.scaling import SPLIT_COL

        prep = self._table(which)
        for i in range(len(prep.parts)):
            x, side = read_part(prep, i, prep.stats)
            if split != "all" and SPLIT_COL in side.columns:
                keep = side[SPLIT_COL].to_numpy() == (split == "val")
                x, side = x[keep], side[keep].reset_index(drop=True)
            yield x, side

    def count(self, which: str = "target", split: str = "all") -> int:
        prep = self._table(which)
        return {"all": prep.n_rows, "val": prep.n_val, "train": prep.n_rows - prep.n_val}[split]

    def sample(self, which: str = "target", split: str = "all", max_rows: int = 100_000,
               seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, int]:
        """A seeded sample of ``max_rows`` rows in input order (all of them when there are no more), read one
        partition at a time: (x, side, number of rows sampled from).

        Each partition keeps a row with a probability a few standard deviations above ``max_rows / total``,
        and the overshoot is trimmed (seeded): the sample has ``max_rows`` rows, not about that many
        (it came out at 991 of a 1,000-row cap, 99,638 of 100,000)."""
        total = self.count(which, split)
        p = 1.0 if total <= max_rows else min(1.0, (max_rows + 6 * math.sqrt(max_rows) + 20) / total)
        xs, sides = [], []
        for i, (x, side) in enumerate(self.parts(which, split)):
            if p < 1.0:
                keep = np.random.default_rng([seed, i]).random(len(x)) < p
                x, side = x[keep], side[keep]
            xs.append(x)
            sides.append(side)
        x = np.concatenate(xs) if xs else np.zeros((0, len(self._table(which).columns)), "float32")
        side = pd.concat(sides, ignore_index=True) if sides else pd.DataFrame()
        if len(x) > max_rows:  # Bernoulli sampling overshot: trim, still seeded
            idx = np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))
            x, side = x[idx], side.iloc[idx].reset_index(drop=True)
        return x, side, total


class TableData(DataKind):
    """CSV/Parquet files, folders or globs: pandera-validated, Dask-preprocessed."""

    name = "table"
    load_stage = "preprocess"

    def inspect(self, app: Application, config: RunConfig, fitted: Fitted | None) -> Inputs:
        from tasks.load import inspect_input

        roles = data_roles(config, fitted)
        nulls = getattr(app, "allow_nulls", False)
        if fitted is not None:
            if config.load.apply_to and config.load.input:
                from tasks.train import run_logger

                run_logger().warning("--model given: --input %s is not used for training; applying to %s",
                                     config.load.input, config.load.apply_to)
            return {"apply_to": inspect_input(roles["apply_to"], config.load, nulls, fitted.schema,
                                              _role_label("apply_to", config))}
        inputs = {"input": inspect_input(roles["input"], config.load, nulls, None, "input")}
        if "apply_to" in roles:
            inputs["apply_to"] = inspect_input(roles["apply_to"], config.load, nulls, inputs["input"].schema, "apply-to")
        return inputs

    def load(self, app: Application, config: RunConfig, run: RunDir, inputs: Inputs, fitted: Fitted | None,
             device: torch.device) -> TableContext:
        from tasks.load import with_schema
        from tasks.preprocess import categories_task, prepare_task

        train_src, target_src = inputs.get("input"), inputs.get("apply_to")
        if train_src is not None:
            # Categories come from the whole training input; data applied to in the same run shares them.
            train_src = categories_task(train_src, config.preprocess)
            if target_src is not None:  # with its own ids' dtype (TableSchema.with_ids_of)
                target_src = with_schema(target_src, replace(train_src.schema, id_dtype=target_src.schema.id_dtype))
        train = prepare_task(train_src, config.preprocess, run, "preprocessed") if train_src is not None else None
        stats = fitted.stats if fitted is not None else train.stats
        target = (prepare_task(target_src, config.preprocess, run, "preprocessed-apply", stats, False)
                  if target_src is not None else train)
        # a reused model's schema, with the label column given for this run (TableSchema.with_label)
        schema = target_src.schema if fitted is not None and target_src is not None else (
            fitted.schema if fitted is not None else train_src.schema)
        notes = [f"warning: {w}" for w in (target.unseen_warnings if target is not train else [])]
        if notes:
            from tasks.train import run_logger

            for n in notes:
                run_logger().warning("%s", n.removeprefix("warning: "))
        return TableContext(config=config, run=run, device=device, notes=notes, schema=schema, train=train,
                            target=target, source=target_src or train_src)

    def fitted_extras(self, meta: dict[str, Any]) -> dict[str, Any]:
        from tasks.scaling import ScalingStats
        from tasks.schemas import TableSchema

        if "schema" not in meta or "stats" not in meta:
            return {}
        return {"schema": TableSchema.from_dict(meta["schema"]), "stats": ScalingStats.from_dict(meta["stats"])}


# ---------------------------------------------------------------------------------------
# Images


@dataclass
class ImageContext(Context):
    """The stages' context for images: the decoded image sets (shards in the run)."""

    train: Any = None  # ImageSet of the training images (None when a model is reused)
    target: Any = None  # ImageSet the model is applied to (None: none given)
    reference: Any = None  # ImageSet of clean references (denoise --clean-reference)

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) indices into ``self.train``: deterministic by relative path and seed."""
        assert self.train is not None
        cfg = self.config.preprocess
        h = np.array([_unit_hash(f"{cfg.split_seed}:{rel}") for rel in self.train.rel])
        val = h < cfg.val_fraction
        if val.all():  # never leave nothing to train on
            val[0] = False
        if cfg.val_fraction > 0 and len(val) >= 2 and not val.any():
            # a few images can all hash above a small fraction (5 images at 0.2: a third of the time): the one of
            # lowest hash is held out, so a metric said to be on held-out images is
            val[int(np.argmin(h))] = True
        idx = np.arange(len(self.train.rel))
        return idx[~val], idx[val]


def _unit_hash(s: str) -> float:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") / 2**64


class ImageData(DataKind):
    """PNG/JPEG files or folders (class subfolders name labels, for the apps that use them): validated and
    decoded on Dask."""

    name = "image"
    load_stage = "load"
    common_options = ("input", "apply_to", "model", "output", "epochs", "batch_size", "lr", "patience", "seed",
                      "device", "val_fraction", "dask_address", "run_id")
    option_help = {
        "input": "Training images: a folder of PNG/JPEG, searched recursively (index: class subfolders name the labels "
                 "of its metrics); local or s3://.",
        "val_fraction": "Share of the training images held out for validation (denoise also scores them).",
        "apply_to": "Images to apply the model to: a folder of PNG/JPEG, local or s3:// (default: the input).",
    }

    def inspect(self, app: Application, config: RunConfig, fitted: Fitted | None) -> Inputs:
        from tasks.images import inspect_images

        load = config.load
        roles = data_roles(config, fitted, "images")
        if load.reference:
            if "apply_to" not in roles:
                raise ConfigError("a clean reference needs the images it belongs to: pass --apply-to")
            roles["reference"] = load.reference
        # A load.size every image is resized to, too small for the network: the setting, before any file is read
        app.check_size_setting(config, [app.SIZE_ROLES[role] for role in roles], fitted)  # type: ignore[attr-defined]
        return {role: inspect_images(uri, _role_label(role, config), skip_bad=load.skip_bad) for role, uri in roles.items()}

    def load(self, app: Application, config: RunConfig, run: RunDir, inputs: Inputs, fitted: Fitted | None,
             device: torch.device) -> ImageContext:
        from tasks.images import (
            MIN_TRAIN_IMAGES,
            check_training_images,
            image_notes,
            load_images_task,
        )
        from tasks.train import run_logger

        # Images smaller than the network needs for their role are refused by name, or left out with --skip-bad
        sizes = {role: (app.min_side(config, app.SIZE_ROLES[role], fitted),  # type: ignore[attr-defined]
                        app.too_small_for(config, app.SIZE_ROLES[role], fitted))  # type: ignore[attr-defined]
                 for role in inputs}
        sets = {role: load_images_task(src, config.load, run, f"images/{role}", *sizes[role])
                for role, src in inputs.items()}
        if "input" in sets:  # the training set (with --model there is none)
            check_training_images(sets["input"], getattr(app, "min_train_images", MIN_TRAIN_IMAGES))
        # Files left out and images converted at the door: said while running and in the run's notes
        # (the result, report/summary.md, `aeflow runs show`), not only in the manifest.
        notes = [n for s in sets.values() for n in image_notes(s)]
        for n in notes:
            if n.startswith("warning: "):
                run_logger().warning("%s", n.removeprefix("warning: "))
            else:
                run_logger().info("%s", n)
        return ImageContext(config=config, run=run, device=device, notes=notes, train=sets.get("input"),
                            target=sets.get("apply_to"), reference=sets.get("reference"))

    def manifest_extra(self, ctx: Context) -> dict[str, Any]:
        sets = {role: s for role, s in (("input", ctx.train), ("apply_to", ctx.target), ("reference", ctx.reference))
                if s is not None}
        return {"images": {role: len(s) for role, s in sets.items()},
                "skipped": [x for s in sets.values() for x in s.skipped]}


def _role_label(role: str, config: RunConfig) -> str:
    """How a role is named in messages: as the option the user gave."""
    if role == "apply_to" and not config.load.apply_to:
        return "input"
    return role.replace("_", "-")


TABLES = TableData()
IMAGES = ImageData()
