"""Table schemas: what a run expects of its input, built from the data and the options.

A :class:`TableSchema` is inferred at fit time (column roles and kinds), saved
with the model, and enforced on every block of every later input with pandera.
Violations are summarised into one message that names the file, the column and
the offending values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa

from tasks.errors import InputError, ModelMismatchError

Kind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class ColumnSpec:
    """One feature column: its name and kind (and, for categoricals, the categories seen at fit)."""

    name: str
    kind: Kind = "numeric"
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableSchema:
    """The columns of a table and their roles.

    Attributes:
        columns: Every column of the files, in file order (excluded ones too).
        features: The model's inputs, in file order.
        label: Evaluation-only column, or None.
        id: Identifier column carried to outputs, or None.
        id_dtype / label_dtype: dtypes those columns are coerced to.
        allow_nulls: Whether feature nulls are allowed (impute only).
    """

    columns: tuple[str, ...]
    features: tuple[ColumnSpec, ...]
    label: str | None = None
    id: str | None = None
    id_dtype: str | None = None
    label_dtype: str | None = None
    excluded: tuple[str, ...] = ()
    allow_nulls: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.features]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = [asdict(c) | {"categories": list(c.categories)} for c in self.features]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableSchema:
        d = dict(d)
        d["columns"] = tuple(d["columns"])
        d["excluded"] = tuple(d.get("excluded", ()))
        d["features"] = tuple(
            ColumnSpec(c["name"], c.get("kind", "numeric"), tuple(c.get("categories", ()))) for c in d["features"]
        )
        return cls(**d)

    @property
    def categorical(self) -> list[ColumnSpec]:
        return [c for c in self.features if c.kind == "categorical"]

    def with_categories(self, categories: dict[str, tuple[str, ...]]) -> TableSchema:
        """A copy whose categorical features carry the categories collected at fit time."""
        d = self.to_dict()
        for c in d["features"]:
            if c["name"] in categories:
                c["categories"] = list(categories[c["name"]])
        return TableSchema.from_dict(d)

    def with_nulls(self, allow: bool) -> TableSchema:
        d = self.to_dict()
        d["allow_nulls"] = allow
        return TableSchema.from_dict(d)

    def check_compatible(self, columns: list[str], where: str) -> None:
        """Raise if a table's columns differ from the ones this schema was fitted on."""
        expected = set(self.columns) - set(self.excluded)
        got = set(columns) - set(self.excluded)
        # The label may be absent when applying (no ground truth); features and id may not.
        optional = {self.label} if self.label else set()
        missing = sorted(expected - got - optional)
        extra = sorted(got - expected)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unexpected {extra}")
            raise ModelMismatchError(
                f"{where} does not have the columns the model was trained on: {', '.join(parts)}"
                f" (expected features {self.feature_names})"
            )


def _dtype_family(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_integer_dtype(series):
        return "int64"
    if pd.api.types.is_float_dtype(series):
        # Integers with nulls read as float: keep float.
        return "float64"
    return "str"


def _is_categorical(series: pd.Series) -> bool:
    """A text column is categorical when most of its sampled values are not numbers.

    A mostly numeric column with a stray string stays numeric, so that value is
    reported as an error by validation instead of silently becoming a category.
    """
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        return False
    values = series.dropna()
    if len(values) == 0:
        return False
    numeric = pd.to_numeric(values.astype(str), errors="coerce").notna().mean()
    return bool(numeric < 0.5)


def infer_schema(
    sample: pd.DataFrame,
    *,
    label: str | None,
    id_column: str | None,
    exclude: tuple[str, ...],
    allow_nulls: bool,
    source: str,
) -> TableSchema:
    """Infer roles and kinds from the first rows of the input.

    Text columns whose sampled values are mostly not numbers are categorical;
    their categories are collected over the whole input later
    (:func:`tasks.preprocess.collect_categories`).

    Raises:
        InputError: an option names a column that is not there, or no feature is left.
    """
    columns = [str(c) for c in sample.columns]
    listing = ", ".join(columns[:20]) + (" …" if len(columns) > 20 else "")
    for role, name in (("label column", label), ("id column", id_column)):
        if name is not None and name not in columns:
            raise InputError(f"{role} {name!r} not found in {source}; its columns are: {listing}")
    for name in exclude:
        if name not in columns:
            raise InputError(f"excluded column {name!r} not found in {source}; its columns are: {listing}")
    if label is not None and label == id_column:
        raise InputError(f"column {label!r} cannot be both the label and the id column")
    roles = {label, id_column, *exclude} - {None}
    features = tuple(
        ColumnSpec(c, "categorical" if _is_categorical(sample[c]) else "numeric")
        for c in columns
        if c not in roles
    )
    if not features:
        raise InputError(f"{source} has no feature columns left after the label, id and excluded columns")
    id_dtype = _dtype_family(sample[id_column]) if id_column else None
    label_dtype = _dtype_family(sample[label]) if label else None
    if id_dtype == "float64":
        id_dtype = "str" if sample[id_column].isna().all() else "float64"
    if label_dtype == "int64":
        label_dtype = "Int64"  # nullable: a missing label must not break the integer type
    return TableSchema(
        columns=tuple(columns),
        features=features,
        label=label,
        id=id_column,
        id_dtype=id_dtype,
        label_dtype=label_dtype,
        excluded=tuple(exclude),
        allow_nulls=allow_nulls,
        # dtypes as read at fit time: outputs that give features back (impute) restore them.
        extra={"dtypes": {c: str(sample[c].dtype) for c in columns}},
    )


def _finite(s: pd.Series) -> pd.Series | bool:
    return np.isfinite(s.astype("float64")) | s.isna()


FLOAT32_MAX = float(np.finfo("float32").max)


def _float32_range(s: pd.Series) -> pd.Series | bool:
    """Finite in float64 but not in the float32 the models compute in (1e308 became inf there);
    infinite values are the ``finite`` check's."""
    x = s.astype("float64")
    return ~(np.isfinite(x) & (np.abs(x) > FLOAT32_MAX))


def pandera_schema(ts: TableSchema, columns_present: list[str] | None = None) -> pa.DataFrameSchema:
    """The pandera schema that every block of input must satisfy."""
    cols: dict[str, pa.Column] = {}
    for c in ts.features:
        if c.kind == "numeric":
            cols[c.name] = pa.Column(
                "float64",
                coerce=True,
                nullable=ts.allow_nulls,
                checks=[pa.Check(_finite, error="finite", name="finite"),
                        pa.Check(_float32_range, error="float32_range", name="float32_range")],
            )
        else:
            cols[c.name] = pa.Column("str", coerce=True, nullable=ts.allow_nulls)
    if ts.id:
        cols[ts.id] = pa.Column(ts.id_dtype or "str", coerce=True, nullable=False)
    if ts.label and (columns_present is None or ts.label in columns_present):
        cols[ts.label] = pa.Column(ts.label_dtype or "str", coerce=True, nullable=True)
    for name in ts.excluded:
        cols[name] = pa.Column(nullable=True, required=False)
    return pa.DataFrameSchema(cols, strict=True, ordered=False)


_CHECK_WORDS = {
    "not_nullable": "null values (use the impute application for data with missing values)",
    "finite": "infinite values",
    "float32_range": "values beyond the range of the 32-bit floats the models compute in (±3.4e38)",
    "column_in_dataframe": "is missing",
    "column_in_schema": "is not expected",
}


def _describe_check(check: str) -> str:
    if check.startswith("coerce_dtype"):
        target = check[len("coerce_dtype(") :].strip("()'\"")
        return "non-numeric values" if target == "float64" else f"values that are not {target}"
    return _CHECK_WORDS.get(check, f"values failing {check}")


def summarise_schema_errors(
    err: pa.errors.SchemaErrors,
    *,
    source: str,
    n_rows: int,
    locate: Any = None,
) -> str:
    """One readable message from pandera's lazy failure report.

    Args:
        err: The lazy validation error.
        source: The file (URI) the block came from.
        n_rows: Rows in the block (to say "entirely null").
        locate: ``locate(index) -> str`` turning a block row index into "line 12"/"row 11".
    """
    fc = err.failure_cases.copy()
    coerced = set(fc.loc[fc["check"].astype(str).str.startswith("coerce_dtype"), "column"].astype(str))
    # Values that cannot be coerced also fail every later check of that column (dtype, finite):
    # report the coercion alone.
    fc = fc[~(~fc["check"].astype(str).str.startswith("coerce_dtype") & fc["column"].astype(str).isin(coerced))]
    parts = []
    for (column, check), grp in fc.groupby([fc["column"].astype(str), fc["check"].astype(str)], sort=False):
        if check == "column_in_schema":
            column = str(grp["failure_case"].iloc[0])
        what = _describe_check(check)
        if check in ("column_in_dataframe", "column_in_schema"):
            parts.append(f"column {column!r} {what}")
            continue
        count = len(grp)
        if check == "not_nullable" and count >= n_rows:
            parts.append(f"column {column!r} is entirely null")
            continue
        examples = []
        for _, row in grp.head(3).iterrows():
            where = locate(row["index"]) if locate is not None and pd.notna(row["index"]) else None
            val = row["failure_case"]
            shown = "null" if check == "not_nullable" else repr(val.item() if hasattr(val, "item") else val)
            examples.append(f"{shown} at {where}" if where else shown)
        more = f" ({count} rows)" if count > 3 else ""
        parts.append(f"column {column!r} has {what}: {', '.join(examples)}{more}")
    return f"{source}: " + "; ".join(parts)


def validate_block(df: pd.DataFrame, ts: TableSchema, *, source: str, locate: Any = None) -> pd.DataFrame:
    """Validate and coerce one block; raise :class:`InputError` naming file, column and values."""
    schema = pandera_schema(ts, list(df.columns))
    try:
        return schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as e:
        message = summarise_schema_errors(e, source=source, n_rows=len(df), locate=locate)
    except pa.errors.SchemaError as e:  # non-lazy paths (e.g. strictness) still raise singly
        message = f"{source}: {e}"
    # Raised outside the handler on purpose: the message carries the summary, and pandera's
    # error object (kept as __context__ otherwise) does not survive pickling back from a Dask worker.
    raise InputError(message)
