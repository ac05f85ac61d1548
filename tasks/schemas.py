"""Table schemas: what a run expects of its input, built from the data and the options.

A :class:`TableSchema` is inferred at fit time (column roles and kinds), saved
with the model, and enforced on every block of every later input with pandera.
Violations are summarised into one message that names the file, the column and
the offending values.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa

from tasks.errors import ConfigError, InputError, ModelMismatchError

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

    def with_label(self, label: str, sample: pd.DataFrame, where: str) -> TableSchema:
        """This (fitted) schema, evaluated against ``label``: ``--label-column`` given when applying a model
        that was trained with another label column or none. It was left out as a column the model was
        trained without, and the metrics said "no label column"."""
        if label == self.label:
            return self
        if label in self.feature_names:
            raise ConfigError(f"--label-column {label!r} is one of the features the model was trained on; a "
                              "label is kept out of the model, so it must be a column the model does not read")
        if label == self.id:
            raise ConfigError(f"--label-column {label!r} is the model's id column")
        if label not in sample.columns:
            raise InputError(f"label column {label!r} not found in {where}"
                             f"{_column_hint(label, [str(c) for c in sample.columns])}")
        columns = self.columns if label in self.columns else (*self.columns, label)
        return replace(self, columns=columns, label=label, label_dtype=_label_dtype(sample[label]),
                       excluded=tuple(c for c in self.excluded if c != label))

    def with_ids_of(self, sample: pd.DataFrame) -> TableSchema:
        """This (fitted) schema with the id column's dtype read from ``sample``, data it is applied to: ids are
        carried to the outputs, not read by the model, so integer ids at fit time do not bind later data to them
        (they were refused as "values that are not int64")."""
        if not self.id or self.id not in sample.columns:
            return self
        return replace(self, id_dtype=_id_dtype(sample[self.id]))

    def check_excluded(self, exclude: tuple[str, ...] | list[str]) -> None:
        """Refuse ``--exclude`` of a column this (fitted) schema's model reads: it read the column all the same
        and said nothing."""
        for name in exclude:
            if name in self.feature_names:
                raise ConfigError(f"--exclude {name!r}: the model was trained on that column and reads it from every "
                                  "table it is applied to; to leave it out, train a model without it")
            if name == self.id:
                raise ConfigError(f"--exclude {name!r}: it is the model's id column, carried to every output")

    def check_id_column(self, id_column: str | None) -> None:
        """Refuse ``--id-column`` naming another column than this (fitted) schema's id column: it was ignored, and
        the data's own id column was reported missing as if it were a feature."""
        if id_column and self.id and id_column != self.id:
            raise ConfigError(f"--id-column {id_column!r}: the model's id column is {self.id!r} (it was trained with "
                              f"--id-column '{self.id}'), and --id-column cannot rename it: the data it is applied "
                              f"to must have its ids in a column named {self.id!r} (rename {id_column!r} to "
                              f"{self.id!r} in the data)")

    def check_compatible(self, columns: list[str], where: str) -> list[str]:
        """Raise if a table lacks columns this schema was fitted on; return the columns it has beyond them.

        Those extra columns are left out when the table is read (the model was trained without them,
        so it cannot use them); the caller says so in the run's notes.
        """
        expected = set(self.columns) - set(self.excluded)
        got = set(columns) - set(self.excluded)
        # The label may be absent when applying (no ground truth); features and id may not.
        optional = {self.label} if self.label else set()
        missing = sorted(expected - got - optional)
        extra = [c for c in columns if c not in expected and c not in self.excluded]
        if missing:
            names = self.feature_names  # a wide table's whole list buried the missing ones: the first 20
            expected = f"{names}" if len(names) <= 20 else f"{len(names)}: {str(names[:20])[:-1]}, …]"
            id_note = f"{self.id!r} is the model's id column; " if self.id in missing else ""
            raise ModelMismatchError(
                f"{where} does not have the columns the model was trained on: missing {missing}"
                f" ({id_note}expected features {expected})"
                + (f"; it has {extra}, which the model was trained without (renamed?)" if extra else "")
            )
        return extra


def _label_dtype(series: pd.Series) -> str:
    """The dtype a label column is read as (nullable integers: a missing label must not break them)."""
    family = _dtype_family(series)
    return "Int64" if family == "int64" else family


def _id_dtype(series: pd.Series) -> str:
    family = _dtype_family(series)
    if family == "int64" and pd.api.types.is_unsigned_integer_dtype(series) and len(series.dropna()) \
            and int(series.max()) > np.iinfo(np.int64).max:
        # 64-bit hash ids past int64 (pandas reads a CSV's as uint64; a Parquet uint64 column): carried as they are
        return "uint64"
    return "str" if family == "float64" and series.isna().all() else family


def written_back(text: str, dtype: str = "int64") -> str | None:
    """How a value read as a number of ``dtype`` is written back, or None when it is not a number: in a column of
    integers ``00042`` -> ``42`` (``1e3`` -> ``1000.0``: a float among them); in one of floats as Python, pandas
    and pyarrow write a float64 back (its shortest repr): ``2.50`` -> ``2.5``, ``17`` -> ``17.0``."""
    if dtype != "float64":
        try:
            return str(int(text))
        except ValueError:
            pass
    try:
        return repr(float(text))
    except ValueError:
        return None


# A float written as its float64 is written back (repr), positionally (1e-4 <= |x| < 1e16) and with at most 15
# digits (16 characters): every such text is its number's shortest repr, so it needs no parsing to be kept.
_FLOAT_AS_WRITTEN = r"-?(?:(?:0|[1-9][0-9]*)\.0|[1-9][0-9]*\.[0-9]*[1-9]|0\.0{0,3}[1-9](?:[0-9]*[1-9])?)"


def changed_as_numbers(text: pd.Series, dtype: str = "int64") -> pd.Series:
    """Which values of a column read as text (a CSV's ids, as written) a number of ``dtype`` (``int64`` or
    ``float64``, how the column would be read) would change, as the outputs write it back: ``00042`` (42), ``+5``,
    ``1e3`` (1000.0), ``1.50``, and among floats ``17`` (17.0): an account number or a zip code would change,
    ``042`` and ``42`` would be one id. Nulls and values that are no number at all (validation's to report) are
    not."""
    values = text.dropna().astype(str).str.strip()
    if dtype == "float64":
        # the common case first, cheaply: every id a float as a float64 writes it back (2.5, 0.1, 17.0)
        values = values[~(values.str.fullmatch(_FLOAT_AS_WRITTEN) & (values.str.len() <= 16))]
    else:
        # the common case first, cheaply: every id an integer as a number writes it (0, or -?[1-9][0-9]*)
        values = values[~values.str.fullmatch(r"0|-?[1-9][0-9]*")]
    if values.empty:
        return pd.Series(False, index=text.index)
    numbers = pd.to_numeric(values, errors="coerce") if dtype != "float64" else None
    if numbers is not None and pd.api.types.is_integer_dtype(numbers):  # every value an integer, without a loop
        changed = numbers.astype(str) != values
    else:
        written = values.map(lambda v: written_back(v, dtype))
        changed = written.notna() & (written != values)
    return changed.reindex(text.index, fill_value=False).astype(bool)


def _is_boolean(series: pd.Series) -> bool:
    """Booleans, also with nulls as pandas reads them from Parquet or CSV: object values True/False/None
    (they were one-hot categories 'False'/'True', and impute gave the column back as text)."""
    if pd.api.types.is_bool_dtype(series):
        return True
    values = series.dropna()
    return series.dtype == object and len(values) > 0 and bool(values.map(lambda v: isinstance(v, (bool, np.bool_))).all())


def _read_dtype(series: pd.Series) -> str:
    """The dtype a column was read with, as outputs that give it back (impute) restore it."""
    return "boolean" if _is_boolean(series) and not pd.api.types.is_bool_dtype(series) else str(series.dtype)


def _dtype_family(series: pd.Series) -> str:
    if _is_boolean(series):
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
    if _is_boolean(series) or pd.api.types.is_numeric_dtype(series):
        return False
    values = series.dropna()
    if len(values) == 0:
        # No value sampled: text by its type (a Parquet string column, sparse at the start) is categorical, its
        # categories collected over the whole input; a CSV column without a sampled value reads as float.
        return isinstance(series.dtype, pd.StringDtype)
    numeric = pd.to_numeric(values.astype(str), errors="coerce").notna().mean()
    return bool(numeric < 0.5)


_ISO_DATE = r"\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
_ISO_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:[.,]\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?"
_ISO_DATETIME = re.compile(rf"{_ISO_DATE}(?:[T ]{_ISO_TIME})?|{_ISO_TIME}")
# Dates as spreadsheets and locales write them: 01/31/2026 and 31/01/26 (either order: each part a day or a month),
# 31.01.2026, 01-31-2026, 2026/01/31, and with a month's name (31 Jan 2026, 31-Jan-26, January 31, 2026); a time may
# follow (01/31/2026 14:30, 2:30 PM). A year is four digits, or two after a slash: 1.2.10 is a version, not a date.
_DM = r"(?:0?[1-9]|[12]\d|3[01])"
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_LOCAL_TIME = r"(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:[.,]\d+)?)?(?:\s?[ap]\.?m\.?)?"
_LOCAL_DATE = re.compile(
    rf"(?:{_DM}/{_DM}/(?:\d{{4}}|\d{{2}})|{_DM}\.{_DM}\.\d{{4}}|{_DM}-{_DM}-\d{{4}}|\d{{4}}/{_DM}/{_DM}"
    rf"|{_DM}[ -]{_MONTH}[ ,-]\s?(?:\d{{4}}|\d{{2}})|{_MONTH} {_DM},? \d{{4}})(?:,?[ T]{_LOCAL_TIME})?",
    re.IGNORECASE,
)
# Digits in groups of three after a separator (1,257.30; 1.257,30; 1 257; 1'257), or one decimal comma (3,5).
_SEPARATED_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:([,. '\u00a0\u202f])\d{3})(?:\1\d{3})*(?:[.,]\d+)?|\d+,\d+)")


# An amount or a share written with a currency symbol or a percent sign ($1,257.30, 1.257,30 €, -12.5%, £ 12).
_NUMBER = r"(?:\d{1,3}(?:[,. '\u00a0\u202f]\d{3})+(?:[.,]\d+)?|\d+(?:[.,]\d+)?|[.,]\d+)"
_SYMBOL = r"[$\u20ac\u00a3\u00a5\u20b9]"  # $ € £ ¥ ₹
_DECORATED_NUMBER = re.compile(
    rf"[+-]?\s?{_SYMBOL}\s?[+-]?{_NUMBER}|[+-]?{_NUMBER}\s?(?:{_SYMBOL}|%)"
)


def _text(values: pd.Series) -> pd.Series:
    return values.astype(str).str.strip()


def _refuse_dates(series: pd.Series, name: str, source: str) -> None:
    """A column of dates or times (a Parquet timestamp, date or time type, or CSV text of which every
    sampled value is an ISO date/time, or every one a date as locales write them: ``_LOCAL_DATE``) is
    not a feature: one-hot encoding its values says nothing a model can use, and a new date is always
    an unseen category."""
    values = series.dropna()
    if len(values) == 0:
        return
    first = values.iloc[0]
    if pd.api.types.is_timedelta64_dtype(series):
        raise InputError(
            f"{source}: column {name!r} holds durations (e.g. {str(first)!r}): convert them to numbers "
            f"(e.g. seconds), or --exclude '{name}'"
        )
    dated = pd.api.types.is_datetime64_any_dtype(series) or (
        series.dtype == object and values.map(lambda v: isinstance(v, (datetime.date, datetime.time))).all()
    )
    if not dated and not pd.api.types.is_bool_dtype(series) and not pd.api.types.is_numeric_dtype(series):
        text = _text(values)
        dated = bool(text.str.fullmatch(_ISO_DATETIME).all() or text.str.fullmatch(_LOCAL_DATE).all())
    if dated:
        raise InputError(
            f"{source}: column {name!r} holds dates/times (e.g. {str(first)!r}); dates and times are not used as "
            f"features: --exclude '{name}' (or, if it identifies rows, give it as --id-column '{name}'); to use "
            f"them, derive numeric columns of your own (e.g. the hour or the day of the week)"
        )


def _refuse_separated_numbers(series: pd.Series, name: str, source: str) -> None:
    """A text column of numbers written with thousands separators (or decimal commas), currency symbols or
    percent signs is refused rather than read as categories; which separator means what depends on a locale,
    which aeflow does not guess (nor whether 12% should be 12 or 0.12)."""
    text = _text(series.dropna())
    separated = text.str.fullmatch(_SEPARATED_NUMBER)
    plain = pd.to_numeric(text, errors="coerce").notna()
    decorated = text.str.fullmatch(_DECORATED_NUMBER)
    if len(text) and decorated.any() and (decorated | separated | plain).all():
        example = text[decorated].iloc[0]
        raise InputError(
            f"{source}: column {name!r} looks like amounts or percentages written with a currency symbol or a "
            f"percent sign (e.g. {example!r}); numbers must be plain, such as 1257.30 or 0.125 (aeflow does not "
            f"strip symbols or guess what a percentage should become): write the column as plain numbers, or "
            f"--exclude '{name}'"
        )
    if len(text) and separated.any() and (separated | plain).all():
        example = text[separated].iloc[0]
        raise InputError(
            f"{source}: column {name!r} looks like numbers written with thousands separators or a decimal comma "
            f"(e.g. {example!r}); numbers must be plain, such as 1257.30 (aeflow does not guess a locale's "
            f"separators): write the column without them (e.g. pandas.read_csv(path, thousands=',')"
            f".to_csv(new_path, index=False)), or --exclude '{name}'"
        )


def _feature_kind(series: pd.Series, name: str, source: str) -> Kind:
    """A feature column's kind; dates/times and numbers with separators or symbols are refused by name."""
    _refuse_dates(series, name, source)
    if not _is_categorical(series):
        return "numeric"
    _refuse_separated_numbers(series, name, source)
    return "categorical"


def _column_hint(name: str, columns: list[str]) -> str:
    """What follows "column X not found in FILE": the closest names first (a typo or another case), then the
    columns (the first 20: a wide table's listing alone did not show 'target' for --label-column targt)."""
    import difflib

    folded = {c.casefold(): c for c in columns}
    close = [folded[name.casefold()]] if name.casefold() in folded else []
    close += [c for c in difflib.get_close_matches(name, columns, n=3, cutoff=0.6) if c not in close]
    listing = ", ".join(columns[:20]) + (" …" if len(columns) > 20 else "")
    did = f" (did you mean {' or '.join(repr(c) for c in close[:3])}?)" if close else ""
    return f"{did}; its columns are: {listing}"


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
        InputError: an option names a column that is not there, no feature is left, or a
            feature column holds dates/times or numbers written with thousands separators.
    """
    columns = [str(c) for c in sample.columns]
    for role, name in (("label column", label), ("id column", id_column)):
        if name is not None and name not in columns:
            raise InputError(f"{role} {name!r} not found in {source}{_column_hint(name, columns)}")
    for name in exclude:
        if name not in columns:
            parts = [p.strip() for p in name.split(",")]
            if len(parts) > 1 and all(p in columns for p in parts):  # --exclude a,b (as --hidden 256,128 is written)
                raise InputError(f"excluded column {name!r} not found in {source}: give --exclude once per column: "
                                 + " ".join(f"--exclude '{p}'" for p in parts)
                                 + f" (in a --config file: exclude_columns: [{', '.join(parts)}])")
            raise InputError(f"excluded column {name!r} not found in {source}{_column_hint(name, columns)}")
    if label is not None and label == id_column:
        # LoadConfig refuses this first (exit 2); a caller that builds no config is refused alike
        raise ConfigError(f"column {label!r} cannot be both the label and the id column")
    roles = {label, id_column, *exclude} - {None}
    features = tuple(ColumnSpec(c, _feature_kind(sample[c], c, source)) for c in columns if c not in roles)
    if not features:
        raise InputError(f"{source} has no feature columns left after the label, id and excluded columns")
    id_dtype = _id_dtype(sample[id_column]) if id_column else None
    label_dtype = _label_dtype(sample[label]) if label else None
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
        extra={"dtypes": {c: _read_dtype(sample[c]) for c in columns},
               # numeric for want of a sampled value: a text value later is explained (summarise_schema_errors)
               "unsampled": [f.name for f in features if f.kind == "numeric" and sample[f.name].isna().all()]},
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
    "not_nullable": "null values",
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


_MOST_PARTS = 6
"""Most column entries one refusal lists in full (a 14-column table with nulls everywhere was ~2,000 chars)."""


def summarise_schema_errors(
    err: pa.errors.SchemaErrors,
    *,
    source: str,
    n_rows: int,
    locate: Any = None,
    id_column: str | None = None,
    unsampled: tuple[str, ...] | list[str] = (),
) -> str:
    """One readable message from pandera's lazy failure report.

    Args:
        err: The lazy validation error.
        source: The file (URI) the block came from.
        n_rows: Rows in the block (to say "entirely null").
        locate: ``locate(index) -> str`` turning a block row index into "line 12"/"row 11".
        id_column: The id column, whose nulls are no missing values to impute but rows without an id.
        unsampled: Columns taken as numeric because the rows sampled at fit time held no value in them.
    """
    fc = err.failure_cases.copy()
    if id_column is not None:
        # A null id past the sampled rows fails the id's integer coercion: it is a null id all the same.
        null_id = (fc["column"].astype(str) == id_column) & fc["failure_case"].isna()
        fc.loc[null_id, "check"] = "not_nullable"
        fc = fc.drop_duplicates(subset=["column", "check", "index"])
    coerced = set(fc.loc[fc["check"].astype(str).str.startswith("coerce_dtype"), "column"].astype(str))
    # Values that cannot be coerced also fail every later check of that column (dtype, finite):
    # report the coercion alone.
    fc = fc[~(~fc["check"].astype(str).str.startswith("coerce_dtype") & fc["column"].astype(str).isin(coerced))]
    parts: list[str] = []
    named: list[str] = []  # the column of each entry of parts
    nulls = False
    for (column, check), grp in fc.groupby([fc["column"].astype(str), fc["check"].astype(str)], sort=False):
        if check == "column_in_schema":
            column = str(grp["failure_case"].iloc[0])
        what = _describe_check(check)
        named.append(column)
        if check in ("column_in_dataframe", "column_in_schema"):
            parts.append(f"column {column!r} {what}")
            continue
        count = len(grp)
        null_ids = check == "not_nullable" and column == id_column
        if check == "not_nullable" and count >= n_rows:
            parts.append(f"id column {column!r} is entirely null: ids must not be null" if null_ids
                         else f"column {column!r} is entirely null")
            continue
        examples = []
        for _, row in grp.head(3).iterrows():
            where = locate(row["index"]) if locate is not None and pd.notna(row["index"]) else None
            val = row["failure_case"]
            shown = "null" if check == "not_nullable" else repr(val.item() if hasattr(val, "item") else val)
            examples.append(f"{shown} at {where}" if where else shown)
        more = f" ({count} rows)" if count > 3 else ""
        if null_ids:
            parts.append(f"id column {column!r} has null values: {', '.join(examples)}{more}; ids must not be null "
                         "(each output row carries its input row's id): fill them in or drop those rows")
            continue
        why = ""
        if check.startswith("coerce_dtype") and what == "non-numeric values" and column in unsampled:
            why = (" (the rows sampled at the start of the input held no value in this column, so it was taken as "
                   "numeric: a text column must have values there, e.g. sort the rows or write the input as Parquet, "
                   f"which records text columns as text; or --exclude '{column}')")
        parts.append(f"column {column!r} has {what}: {', '.join(examples)}{more}{why}")
        nulls |= check == "not_nullable"
    if len(parts) > _MOST_PARTS:  # a wide table with nulls everywhere: the first columns, then the others' names
        rest = list(dict.fromkeys(named[_MOST_PARTS - 1:]))
        shown = ", ".join(repr(c) for c in rest[:10]) + (", ..." if len(rest) > 10 else "")
        parts = parts[:_MOST_PARTS - 1] + [f"and {len(parts) - _MOST_PARTS + 1} more (columns {shown})"]
    hint = " (use the impute application for data with missing values)" if nulls else ""
    return f"{source}: " + "; ".join(parts) + hint


def validate_block(df: pd.DataFrame, ts: TableSchema, *, source: str, locate: Any = None) -> pd.DataFrame:
    """Validate and coerce one block; raise :class:`InputError` naming file, column and values."""
    schema = pandera_schema(ts, list(df.columns))
    try:
        return schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as e:
        message = summarise_schema_errors(e, source=source, n_rows=len(df), locate=locate, id_column=ts.id,
                                          unsampled=ts.extra.get("unsampled", ()))
    except pa.errors.SchemaError as e:  # non-lazy paths (e.g. strictness) still raise singly
        message = f"{source}: {e}"
    # Raised outside the handler on purpose: the message carries the summary, and pandera's
    # error object (kept as __context__ otherwise) does not survive pickling back from a Dask worker.
    raise InputError(message)
