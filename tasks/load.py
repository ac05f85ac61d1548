"""Validated loading of tables (CSV/Parquet file, folder or glob at any fsspec URI).

``inspect_table`` looks at every file's header/footer once (cheap: no data is
read beyond a small sample) to check that the files agree, infer the schema and
plan the Dask partitions. ``to_dask`` turns the plan into a lazy Dask DataFrame
whose partitions are parsed *and validated with pandera* by the workers; a bad
value surfaces at the first compute as an :class:`InputError` naming the file,
the column and the value.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import lzma
import re
import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import read_block as fs_read_block
from prefect import task

from tasks.config import LoadConfig
from tasks.errors import InputError
from tasks.inputs import content_hash, find_files
from tasks.prefect_utils import IO_TASK
from tasks.schemas import TableSchema, changed_as_numbers, infer_schema, validate_block, written_back
from tasks.storage import (
    FileRecord,
    is_local,
    relative_note,
    shown_uri,
    storage_op,
    to_uri,
    url_to_fs,
)

log = logging.getLogger("aeflow.load")

_EXTENSIONS = {".csv": "csv", ".csv.gz": "csv", ".csv.bz2": "csv", ".csv.xz": "csv", ".parquet": "parquet",
               ".pq": "parquet"}
# Archives and codecs a table is not read from (a zip may hold many files): named by their extension
_UNREAD = {".zip": "a zip archive", ".zst": "zstd-compressed", ".7z": "a 7z archive", ".tar": "a tar archive",
           ".tgz": "a tar archive", ".rar": "a rar archive"}
SAMPLE_ROWS = 2000


def _format_of(path: str) -> str | None:
    low = path.lower()
    for ext, fmt in sorted(_EXTENSIONS.items(), key=lambda kv: -len(kv[0])):
        if low.endswith(ext):
            return fmt
    return None


@dataclass(frozen=True)
class Block:
    """One Dask partition: a byte range of a CSV file or row groups of a Parquet file."""

    uri: str
    fmt: str
    index: int
    offset: int = 0
    length: int | None = None
    row_groups: tuple[int, ...] = ()
    row_offset: int | None = 0
    compression: str | None = None
    columns: tuple[str, ...] = ()  # a CSV file's own header, in its order (files of a glob may order them differently)
    # A CSV byte range cut at a record's end (a file with line breaks in quoted fields): read as it is, where a plain
    # range starts after the first newline at or after its offset and runs to the first one after its end
    exact: bool = False


@dataclass(frozen=True)
class TableSource:
    """An inspected input: its files (with hashes), partition plan and schema."""

    uri: str
    fmt: str
    files: tuple[FileRecord, ...]
    blocks: tuple[Block, ...]
    schema: TableSchema
    columns: tuple[str, ...]
    # Columns of data a model is applied to that it was trained without: not read (said in the run's notes).
    ignored: tuple[str, ...] = ()

    @property
    def shown(self) -> str:
        """The input's URI as messages show it (a local path absolute: README, "Bad input")."""
        return shown_uri(self.uri)

    @property
    def n_partitions(self) -> int:
        return len(self.blocks)


def list_table_files(uri: str, fmt: str = "auto", role: str = "input") -> tuple[object, list[str]]:
    """Resolve a file, folder (recursive) or glob to the table files it names.

    Raises:
        InputError: nothing there, a missing bucket, or no CSV/Parquet files.
    """
    fs, paths, _root = find_files(uri, role)
    if fmt != "auto":
        # A file named directly is read as --format says, whatever its name (e.g. Parquet named .csv).
        typed = paths if len(paths) == 1 else [p for p in paths if _format_of(p) in (fmt, None)]
    else:
        typed = [p for p in paths if _format_of(p) is not None]
        unknown = [p for p in paths if _format_of(p) is None]
        if unknown and len(paths) == 1:
            low = unknown[0].lower()
            kind = next((what for ext, what in _UNREAD.items() if low.endswith(ext)), None)
            if kind:
                raise InputError(f"{to_uri(fs, unknown[0])} is {kind}, which is not read: extract the table, or "
                                 "compress a CSV with gzip, bzip2 or xz (.csv.gz, .csv.bz2, .csv.xz)")
            raise InputError(
                f"{to_uri(fs, unknown[0])}: unknown file type; use .csv (also .csv.gz, .csv.bz2, .csv.xz) or "
                ".parquet, or pass --format"
            )
    if not typed:
        raise InputError(f"no CSV or Parquet files found at {uri}{relative_note(uri) if is_local(fs) else ''}")
    return fs, typed


_BOM = b"\xef\xbb\xbf"
_PARQUET_MAGIC = b"PAR1"
# Compressed streams a CSV is read through, by their first bytes: fsspec's compression names
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
# ... and what is refused by its first bytes, whatever the file's name
_UNREAD_MAGIC = {b"PK\x03\x04": "a zip archive", b"\x28\xb5\x2f\xfd": "zstd-compressed", b"7z\xbc\xaf": "a 7z archive"}
_TRUNCATED = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def _sniff(fs, path: str, uri: str) -> str:
    """What the first bytes say a file is: ``parquet``, a compression (``gzip``, ``bz2``, ``xz``) or ``text`` (by
    content, not by name); an archive or codec that is not read is refused here."""
    with storage_op("read", uri), fs.open(path, "rb") as f:
        head = f.read(6)
    if head[:4] == _PARQUET_MAGIC:
        return "parquet"
    for magic, name in _COMPRESSED.items():
        if head.startswith(magic):
            return name
    for magic, what in _UNREAD_MAGIC.items():
        if head.startswith(magic):
            raise InputError(f"{uri} is {what}, which is not read: extract the table, or compress a CSV with gzip, "
                             "bzip2 or xz (.csv.gz, .csv.bz2, .csv.xz)")
    return "text"


def _check_format(fmt: str, content: str, uri: str, by: str) -> str | None:
    """Refuse a file whose content contradicts its format; returns the CSV compression to read it with."""
    if fmt == "csv" and content == "parquet":
        raise InputError(
            f"{uri} is a Parquet file (it starts with the Parquet magic bytes PAR1), not CSV as {by} says: "
            "rename it to .parquet or pass --format parquet"
        )
    if fmt == "parquet" and content != "parquet":
        what = f"{content}-compressed data" if content != "text" else "no Parquet magic bytes; it looks like text, e.g. CSV"
        raise InputError(
            f"{uri} is not a Parquet file ({what}), although {by} says Parquet: rename it or pass --format csv"
        )
    return None if content == "text" else content


def _unique_columns(cols: list[str], uri: str) -> None:
    seen: dict[str, int] = {}
    for i, c in enumerate(cols, 1):
        if c in seen:
            raise InputError(
                f"{uri}: column name {c!r} appears more than once in the header (columns {seen[c]} and {i}); "
                "column names must be unique"
            )
        seen[c] = i


def _csv_header(fs, path: str, compression: str | None) -> list[str]:
    with fs.open(path, "rb", compression=compression) as f:
        head = f.read(1 << 16)
        while b"\n" not in head:
            more = f.read(1 << 16)
            if not more:
                break
            head += more
    # A UTF-8 byte-order mark (as spreadsheets write CSV) is not part of the first column's name.
    line = head.removeprefix(_BOM).split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    if not line:
        return []
    # A column without a name is called as pandas calls it (its index, written by to_csv(), has none).
    return [c.strip() or f"Unnamed: {i}" for i, c in enumerate(next(csv.reader([line])))]


_OTHER_SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe"}


def _one_column(cols: list[str], uri: str) -> None:
    """A header that is one column holding another separator: the file is not comma-separated."""
    if len(cols) == 1:
        for sep, name in _OTHER_SEPARATORS.items():
            if sep in cols[0]:
                raise InputError(
                    f"{uri}: the header line is one column, {cols[0][:80]!r}: the file looks {name}-separated; "
                    f"aeflow reads comma-separated CSV (or Parquet): convert it, e.g. "
                    f"pandas.read_csv(path, sep={sep!r}).to_csv(new_path, index=False)"
                )


def _wider_rows(fs, path: str, compression: str | None, cols: list[str], uri: str) -> None:
    """Refuse a first data line with more (non-empty) fields than the header: pandas took the extra leading
    fields as the index, so every column was read from its neighbour's values (ids from the first feature...).
    Empty extra fields (data lines ending with a comma, the header not) are dropped (``index_col=False``)."""
    with fs.open(path, "rb", compression=compression) as f:
        f.readline()
        line = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    fields = next(csv.reader([line]), [])
    if len(fields) > len(cols) and any(v.strip() for v in fields[len(cols):]):
        raise InputError(
            f"{uri}: line 2 has {len(fields)} fields but the header names {len(cols)} column(s)"
            + (" (a title line above the header? remove it)" if len(cols) == 1 else
               " (a column without a name in the header, or a separator inside an unquoted value?)")
        )


def _unnamed(cols: list[str], load: LoadConfig, uri: str) -> None:
    """A CSV column without a name must be given a role: pandas writes its row index that way, and
    row numbers are not a feature."""
    named = {load.id_column, load.label_column, *load.exclude_columns}
    for i, c in enumerate(cols):
        if c == f"Unnamed: {i}" and c not in named and i == len(cols) - 1 > 0:
            raise InputError(  # pandas' index comes first; a last one is a separator at the end of the lines
                f"{uri}: the last column ({i + 1}) has no name in the header line (do the lines end with a comma, as "
                f"some exports write them?): --exclude '{c}' to leave it out, or write the file without the trailing comma"
            )
        if c == f"Unnamed: {i}" and c not in named:
            raise InputError(
                f"{uri}: column {i + 1} has no name in the header line (pandas writes its row index that way; "
                f"write the file with index=False), or give it a role: --exclude '{c}' or --id-column '{c}'"
            )


def _parquet_meta(fs, path: str, uri: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except Exception as e:
        raise InputError(f"{uri}: not a readable Parquet file ({type(e).__name__}: {e})") from e


def _nested(pf: pq.ParquetFile, cols: list[str], excluded: set[str], uri: str) -> None:
    """List, struct and map columns are refused by name (read as text, a list became one category per value)."""
    for name in cols:
        if name in excluded:
            continue
        typ = pf.schema_arrow.field(name).type
        if pa.types.is_nested(typ):
            raise InputError(
                f"{uri}: column {name!r} holds {typ} values; aeflow reads columns of numbers, text, booleans or "
                f"categories: --exclude '{name}', or flatten it into columns"
            )


def _parquet_columns(pf: pq.ParquetFile) -> list[str]:
    names = list(pf.schema_arrow.names)
    meta = pf.schema_arrow.pandas_metadata or {}
    index_cols = {c for c in meta.get("index_columns", []) if isinstance(c, str)}
    return [n for n in names if n not in index_cols]


def inspect_table(
    uri: str,
    load: LoadConfig,
    *,
    allow_nulls: bool = False,
    schema: TableSchema | None = None,
    role: str = "input",
) -> TableSource:
    """Check the files at ``uri`` agree, plan partitions, and infer (or check) the schema.

    Args:
        uri: File, folder or glob.
        load: Roles of columns and the block size.
        allow_nulls: Whether feature nulls pass validation (impute only).
        schema: A schema fitted earlier (``--model``/``--apply-to``): the files
            must have its columns (others are left out: ``TableSource.ignored``);
            otherwise one is inferred from a sample.
        role: How to call this input in messages (``input``, ``apply-to``).

    Raises:
        InputError / ModelMismatchError: with a message naming the file and the problem.
    """
    fs, paths = list_table_files(uri, load.format, role)
    blocksize = load.blocksize_mb * (1 << 20)
    files: list[FileRecord] = []
    blocks: list[Block] = []
    columns: list[str] | None = None
    first_uri = ""
    sample: pd.DataFrame | None = None
    sample_ids: list[pd.Series] = []  # the CSV sample's ids as written, decided on together (_ids_as_written)
    # CSV columns of numbers with nulls (read as float64): whether every sampled file wrote their values as integers
    int_columns: dict[str, bool] = {}
    fmt_seen: set[str] = set()
    excluded, seen_columns = set(load.exclude_columns), set()
    id_column = schema.id if schema is not None else load.id_column
    for path in paths:
        furi = to_uri(fs, path)
        fmt = load.format if load.format != "auto" else _format_of(path)
        fmt_seen.add(fmt)
        with storage_op("read", furi):
            info = fs.info(path)
        size = int(info.get("size") or 0)
        if size == 0:
            raise InputError(f"{furi} is empty (0 bytes)")
        by = "--format" if load.format != "auto" else "its name"
        compression = _check_format(fmt, _sniff(fs, path, furi), furi, by)
        if fmt == "csv":
            breaks = False  # line breaks inside the quoted fields of this file's sampled rows
            try:
                with storage_op("read", furi):
                    cols = _csv_header(fs, path, compression)
                    if not cols or all(c == "" for c in cols):
                        raise InputError(f"{furi} has no header line")
                    _unique_columns(cols, furi)
                    if schema is None:  # with a fitted schema, a column it lacks is left out (ignored)
                        _unnamed(cols, load, furi)
                    _one_column(cols, furi)
                    _wider_rows(fs, path, compression, cols, furi)
                    if sample is None or (len(sample) < SAMPLE_ROWS and fmt_seen == {"csv"}):
                        # The input's first rows, over as many files as it takes (as one file of them all would
                        # be sampled): a short first file alone made a column of its text categorical, and the
                        # numbers of the next files its "more than 100 distinct values".
                        rows, ids_text = _csv_sample(fs, path, compression, cols, furi,
                                                     SAMPLE_ROWS - (0 if sample is None else len(sample)), id_column)
                        breaks = _has_line_breaks(rows)
                        for name, whole in _integers_as_written(fs, path, compression, cols, rows).items():
                            int_columns[name] = int_columns.get(name, True) and whole
                        if ids_text is not None:
                            sample_ids.append(ids_text)
                        sample = rows if sample is None else pd.concat(
                            [sample, rows[[c for c in sample.columns if c in rows.columns]]], ignore_index=True)
                    else:
                        with fs.open(path, "rb", compression=compression) as f:
                            f.readline()
                            if not f.readline().strip():
                                raise InputError(f"{furi} has a header but no data rows")
            except (pd.errors.ParserError, UnicodeDecodeError) as e:
                raise InputError(f"{furi}: not a readable CSV file ({e})") from e
            except _TRUNCATED as e:
                raise InputError(f"{furi}: the file is truncated or corrupted ({type(e).__name__}: {e})") from e
            except OSError as e:
                if compression:  # bz2: "Invalid data stream"
                    raise InputError(f"{furi}: the file is truncated or corrupted ({type(e).__name__}: {e})") from e
                raise
            exact = False
            if compression or size <= blocksize:
                spans = [(0, None)]
            elif breaks:
                # a newline inside a quoted field is no place to cut: the ranges end at records' ends (one pass)
                _run_log().info("%s has line breaks inside quoted fields: its %d MB are cut into partitions at "
                                "records' ends (one pass over the file)", furi, size >> 20)
                spans, exact = _record_spans(fs, path, size, blocksize, furi), True
            else:
                spans = [(o, min(blocksize, size - o)) for o in range(0, size, blocksize)]
            for j, (off, length) in enumerate(spans):
                blocks.append(Block(furi, "csv", len(blocks), off, length, (), 0 if j == 0 else None, compression,
                                    tuple(cols), exact and length is not None))
        else:
            with storage_op("read", furi):
                pf = _parquet_meta(fs, path, furi)
            cols = _parquet_columns(pf)
            _unique_columns(cols, furi)
            known = set(schema.columns) - set(schema.excluded) if schema is not None else set(cols)
            _nested(pf, cols, {*load.exclude_columns, *(c for c in cols if c not in known)}, furi)
            if pf.metadata.num_rows == 0:
                raise InputError(f"{furi} has a schema but no data rows")
            if sample is None or (len(sample) < SAMPLE_ROWS and fmt_seen == {"parquet"}):
                # The input's first rows over as many row groups and files as it takes, as for CSV: a short
                # first file (or row group) alone decided the columns' kinds, e.g. numeric for a text column
                # whose few first values were null.
                rows = _parquet_sample(pf, cols, SAMPLE_ROWS - (0 if sample is None else len(sample)), furi)
                sample = rows if sample is None else pd.concat(
                    [sample, rows[[c for c in sample.columns if c in rows.columns]]], ignore_index=True)
            group, group_bytes, row_offset, group_start = [], 0, 0, 0
            for rg in range(pf.num_row_groups):
                meta = pf.metadata.row_group(rg)
                if group and group_bytes + meta.total_byte_size > blocksize:
                    blocks.append(Block(furi, "parquet", len(blocks), row_groups=tuple(group), row_offset=group_start))
                    group, group_bytes, group_start = [], 0, row_offset
                group.append(rg)
                group_bytes += meta.total_byte_size
                row_offset += meta.num_rows
            blocks.append(Block(furi, "parquet", len(blocks), row_groups=tuple(group), row_offset=group_start))
        seen_columns.update(cols)
        if columns is None:
            columns, first_uri = cols, furi
        elif set(cols) - excluded != set(columns) - excluded:  # an --exclude'd column may come and go
            missing = sorted(set(columns) - set(cols) - excluded)
            extra = sorted(set(cols) - set(columns) - excluded)
            drift = missing + extra
            raise InputError(
                f"{furi} has different columns from {first_uri}: "
                + ", ".join(p for p in (f"missing {missing}" if missing else "", f"extra {extra}" if extra else "") if p)
                + f"; the files of one input must have the same columns, apart from --exclude'd ones "
                f"(e.g. --exclude '{drift[0]}' to leave it out of every file)"
            )
        files.append(FileRecord(path=furi, size=size, hash=content_hash(fs, path, info)))
    if len(fmt_seen) > 1:
        raise InputError(f"{shown_uri(uri)} mixes CSV and Parquet files; point it at one kind")
    assert columns is not None and sample is not None
    if sample_ids and id_column in sample.columns and sum(map(len, sample_ids)) == len(sample):
        # over the whole sample: a file of float ids (2.5) and one of integers (17, read as 17.0 beside them)
        sample[id_column] = _ids_as_written(sample[id_column], pd.concat(sample_ids, ignore_index=True))
    source_name = first_uri if len(files) == 1 else f"{shown_uri(uri)} ({len(files)} files)"
    ignored: list[str] = []
    if schema is None:
        schema = infer_schema(
            sample,
            label=load.label_column,
            id_column=load.id_column,
            # one that only later files have is left out of them when they are read (not a column of the schema)
            exclude=tuple(c for c in load.exclude_columns if c in sample.columns or c not in seen_columns),
            allow_nulls=allow_nulls,
            source=source_name,
        )
        integers = [c for c, whole in int_columns.items() if whole and schema.extra["dtypes"].get(c) == "float64"]
        if integers:
            # a CSV column of integers with empty cells, as written ("8", "", "9"): pandas reads it as float64, and
            # impute gave it back with filled cells of 12.01 where the same column from Parquet (Int64) is rounded
            schema.extra["dtypes"].update(dict.fromkeys(integers, "Int64"))
    else:
        schema.check_excluded(load.exclude_columns)
        schema.check_id_column(load.id_column)
        extra = schema.check_compatible(columns, f"{role} {source_name}")
        schema = schema.with_ids_of(sample)
        if load.label_column:  # metrics against the label given now, also when the model was trained without one
            schema = schema.with_label(load.label_column, sample, f"{role} {source_name}")
        ignored = [c for c in extra if c not in load.exclude_columns and c != schema.label]  # excluded by the user: nothing to say
        schema = schema.with_nulls(allow_nulls)
    return TableSource(uri, next(iter(fmt_seen)), tuple(files), tuple(blocks), schema, tuple(columns), tuple(ignored))


def _parquet_sample(pf, cols: list[str], nrows: int, uri: str) -> pd.DataFrame:
    """The first ``nrows`` rows of the Parquet file ``pf`` (as many row groups as they span)."""
    parts, left = [], nrows
    with storage_op("read", uri):
        for rg in range(pf.num_row_groups):
            if left <= 0:
                break
            table = pf.read_row_group(rg, columns=cols).slice(0, left)
            parts.append(table)
            left -= table.num_rows
    return pa.concat_tables(parts).to_pandas()


def _csv_sample(fs, path: str, compression: str | None, cols: list[str], uri: str, nrows: int,
                id_column: str | None) -> tuple[pd.DataFrame, pd.Series | None]:
    """The first ``nrows`` rows of a CSV file, named by its header, and its ids as written (text; None without
    an id column): the input's sample decides on them (:func:`_ids_as_written`)."""
    with fs.open(path, "rb", compression=compression) as f:
        rows = pd.read_csv(f, nrows=nrows, index_col=False)
    if len(rows) == 0:
        raise InputError(f"{uri} has a header but no data rows")
    rows = _named(rows, cols, uri)
    if id_column not in cols:
        return rows, None
    with fs.open(path, "rb", compression=compression) as f:
        text = pd.read_csv(f, nrows=nrows, index_col=False, usecols=[cols.index(id_column)], dtype=str)
    return rows, text.iloc[:, 0].set_axis(rows.index)


def _integers_as_written(fs, path: str, compression: str | None, cols: list[str],
                         rows: pd.DataFrame) -> dict[str, bool]:
    """Of a CSV's sampled ``rows``, the columns read as float64 because of empty cells: {name: whether every sampled
    value was written as an integer (pandas' nullable parsing reads the column as Int64)}."""
    holes = [c for c in rows.columns if rows[c].dtype == "float64" and rows[c].isna().any() and rows[c].notna().any()]
    if not holes:
        return {}
    with fs.open(path, "rb", compression=compression) as f:
        typed = pd.read_csv(f, nrows=len(rows), index_col=False, usecols=[cols.index(c) for c in holes],
                            dtype_backend="numpy_nullable")
    typed.columns = [cols[i] for i in sorted(cols.index(c) for c in holes)]
    return {c: pd.api.types.is_integer_dtype(typed[c]) for c in holes}


def _ids_as_written(parsed: pd.Series, text: pd.Series) -> pd.Series:
    """A CSV id column as pandas read it (numbers), or as written (``text``) when a number would change an id as
    the outputs write it back (``00042`` became 42, ``2.50`` 2.5, ``1e3`` 1000.0, and ``17`` among floats 17.0):
    the schema then records text ids (``id_dtype`` "str"), and every block reads them as text
    (:func:`read_block`). In a sample of several files, text ids of one make the column text (object)."""
    if pd.api.types.is_numeric_dtype(parsed) and not pd.api.types.is_bool_dtype(parsed) \
            and changed_as_numbers(text, "float64" if pd.api.types.is_float_dtype(parsed) else "int64").any():
        return text
    return parsed


def _named(df: pd.DataFrame, cols: list[str] | tuple[str, ...], uri: str) -> pd.DataFrame:
    """A parsed CSV block with the header's column names (as ``_csv_header`` reads them: stripped, unnamed
    ones named), or one message when the rows have more fields than the header."""
    if len(df.columns) != len(cols):
        raise InputError(f"{uri}: the header names {len(cols)} columns but the rows have {len(df.columns)} fields")
    df.columns = list(cols)
    return df


def _run_log() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (the run's log and the console), or this module's outside a run."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow/task run
        return log


def _has_line_breaks(rows: pd.DataFrame) -> bool:
    """Whether a text value of a CSV's parsed rows holds a line break (a quoted field spanning lines)."""
    for name in rows.columns:
        if rows[name].dtype == object or isinstance(rows[name].dtype, pd.StringDtype):
            if rows[name].dropna().astype(str).str.contains("[\r\n]", regex=True).any():
                return True
    return False


def _record_spans(fs, path: str, size: int, blocksize: int, uri: str) -> list[tuple[int, int]]:
    """Byte ranges of a CSV of about ``blocksize`` each, every one ending at a record's end: after a newline outside
    quoted fields (an even number of ``"`` before it: an escaped quote is two). One pass over the file."""
    spans: list[tuple[int, int]] = []
    start, target, pos, odd = 0, blocksize, 0, 0
    with storage_op("read", uri), fs.open(path, "rb") as f:
        while data := f.read(1 << 24):
            arr = np.frombuffer(data, dtype=np.uint8)
            quotes = np.flatnonzero(arr == 34)
            newlines = np.flatnonzero(arr == 10)
            ends = newlines[(np.searchsorted(quotes, newlines) + odd) % 2 == 0] + pos + 1
            while (k := int(np.searchsorted(ends, target))) < len(ends) and ends[k] < size:
                spans.append((start, int(ends[k]) - start))
                start = int(ends[k])
                target = start + blocksize
            odd = (odd + len(quotes)) % 2
            pos += len(data)
    spans.append((start, size - start))
    return spans


def _block_bytes(fs, path: str, block: Block) -> bytes:
    """The bytes of a CSV byte-range block: exactly its range when cut at records' ends, else fsspec's
    newline-delimited block."""
    with fs.open(path, "rb") as f:
        if block.exact:
            f.seek(block.offset)
            return f.read(block.length)
        return fs_read_block(f, block.offset, block.length, delimiter=b"\n")


def _lines_before(block: Block) -> int:
    """Lines of the file before the first line of a CSV byte-range block (header included).

    ``fsspec.utils.read_block`` starts a block after the first newline at or after its
    offset, so the block's first line follows the newlines in ``[0, offset]``. Counted only
    when an error needs it: a pass over the file up to the block.
    """
    fs, path = url_to_fs(block.uri)
    n, remaining = 0, block.offset
    with storage_op("read", block.uri), fs.open(path, "rb") as f:
        while remaining > 0:
            chunk = f.read(min(1 << 24, remaining))
            if not chunk:
                break
            n += chunk.count(b"\n")
            remaining -= len(chunk)
    return n if block.exact else n + 1


def _locate(block: Block):
    """``locate(i)``: where row ``i`` of a block is in its file, as people look for it (line or row)."""
    if block.row_offset is None:
        base: list[int] = []

        def line(i: Any) -> str:
            if not base:
                base.append(_lines_before(block))
            return f"line {base[0] + int(i) + 1}"

        return line
    if block.fmt == "csv":
        return lambda i: f"line {int(i) + 2}"
    return lambda i: f"row {block.row_offset + int(i)}"


_PANDAS_LINE = re.compile(r"\bline (\d+)")


def _parse_error(block: Block, e: BaseException) -> InputError:
    """A parse failure of a block as one message naming the file and, for CSV, the file's line."""
    text = f"{type(e).__name__}: {str(e).strip()}"  # pandas ends its tokenizer message with a newline
    if isinstance(e, _TRUNCATED) or (block.compression and isinstance(e, OSError)):
        return InputError(f"{block.uri}: the file is truncated or corrupted ({text})")
    if block.fmt == "csv" and block.row_offset is None:  # pandas counts lines within the block
        base = _lines_before(block)
        text = _PANDAS_LINE.sub(lambda m: f"line {base + int(m.group(1))}", text)
    return InputError(f"{block.uri}: cannot parse ({text}){_quoted_break_hint(block)}")


def _quoted_break_hint(block: Block) -> str:
    """For a byte-range block of a CSV that holds quoted fields: what a line break inside one past the sampled rows
    does (a cut in the middle of a record: "EOF inside string", or a line of one field), and what to do."""
    if block.fmt != "csv" or block.length is None or block.exact:
        return ""
    fs, path = url_to_fs(block.uri)
    try:
        with storage_op("read", block.uri):
            quoted = b'"' in _block_bytes(fs, path, block)
    except Exception:  # noqa: BLE001 - a hint only
        return ""
    if not quoted:
        return ""
    return (f"; if a quoted field past the first {SAMPLE_ROWS} rows holds a line break, the file's partitions (byte "
            f"ranges of load.blocksize_mb) cut that record: set load.blocksize_mb above the file's size to read it "
            "in one piece, or have such a field among the first rows, which makes the partitions end at records' ends")


def read_decimal_columns(block: Block, names: list[str]) -> dict[str, tuple[np.ndarray, pa.DataType]]:
    """Of ``names``, the Parquet decimal columns of the block's file: {name: (its values as ``Decimal``
    objects, exactly as stored, None where null; its Arrow type)}. Nothing for CSV or when none is decimal.

    :func:`read_block` gives features as float64; an output that gives the input's own columns back
    (impute) takes these instead, so that money stays money (no float rounding of 20-digit values).
    """
    if block.fmt != "parquet" or not names:
        return {}
    fs, path = url_to_fs(block.uri)
    with storage_op("read", block.uri):
        pf = pq.ParquetFile(fs.open(path, "rb"))
        types = {f.name: f.type for f in pf.schema_arrow}
        wanted = [n for n in names if n in types and pa.types.is_decimal(types[n])]
        if not wanted:
            return {}
        table = pf.read_row_groups(list(block.row_groups), columns=wanted)
    return {n: (np.array(table.column(n).to_pylist(), dtype=object), types[n]) for n in wanted}


def read_block(block: Block, schema: TableSchema, file_columns: tuple[str, ...]) -> pd.DataFrame:
    """Parse and validate one partition (runs on a Dask worker).

    Returns the block with feature columns as float64, id/label coerced, and
    excluded columns dropped, in file column order. Anything wrong with the file
    (a value, a truncated gzip stream met only here, past the sampled rows) is one
    :class:`InputError` naming the file and its line; an outage of the store is a
    :class:`~tasks.errors.StorageUnavailable`.
    """
    fs, path = url_to_fs(block.uri)
    # A CSV's ids are read as written: kept as text when the sample's were (00042 was read as 42 in a block
    # that held no other text), else checked that numbers do not change them (_ids_changed: 00042, 2.50)
    names = list(block.columns or file_columns)
    ids = ({names.index(schema.id): str} if block.fmt == "csv" and schema.id in names
           and schema.id_dtype in ("str", "int64", "uint64", "float64") else None)
    try:
        # Mixed types within a column are the schema's to report (by line), not pandas' DtypeWarning's
        with storage_op("read", block.uri), warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            if block.fmt == "csv":
                if block.length is None:
                    with fs.open(path, "rb", compression=block.compression) as f:
                        df = pd.read_csv(f, index_col=False, dtype=ids)
                else:
                    data = _block_bytes(fs, path, block)
                    if block.offset == 0:
                        df = pd.read_csv(io.BytesIO(data), index_col=False, dtype=ids)
                    else:
                        df = pd.read_csv(io.BytesIO(data), header=None, names=names, index_col=False, dtype=ids)
            else:
                pf = pq.ParquetFile(fs.open(path, "rb"))
                # not the columns a model was trained without, nor excluded ones (a later file may lack them)
                wanted = [c for c in file_columns if c in schema.columns and c not in schema.excluded]
                df = pf.read_row_groups(list(block.row_groups), columns=wanted).to_pandas()
    except InputError:
        raise
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError, *_TRUNCATED) as e:
        err = _parse_error(block, e)
    else:
        err = None
    if err is not None:
        # Raised outside the handler: the message says it all, and the cause may not pickle back from a worker.
        raise err
    if block.fmt == "csv" and block.columns:
        df = _named(df, block.columns, block.uri)
    df.columns = [str(c) for c in df.columns]
    if list(df.columns) != list(file_columns) and set(df.columns) == set(file_columns):
        df = df[list(file_columns)]  # a file of the glob with the same columns in another order
    if ids and schema.id_dtype != "str":
        _ids_changed(df[schema.id].reset_index(drop=True), block, schema.id, schema.id_dtype)
        try:  # as pandas would have read them (validation's coercion of text is slower); else validation says why
            df[schema.id] = df[schema.id].astype(schema.id_dtype)
        except (ValueError, TypeError, OverflowError):
            pass
    known = set(schema.columns)
    if not known.issuperset(df.columns):  # data a model is applied to: columns it was trained without are left out
        df = df[[c for c in df.columns if c in known]]
    try:
        df = validate_block(df.reset_index(drop=True), schema, source=block.uri, locate=_locate(block))
    except InputError as e:
        short = _short_line(block, len(file_columns)) if block.fmt == "csv" else None
        if short is None:
            raise
        i, fields = short
        raise InputError(f"{block.uri}: {_locate(block)(i)} has {fields} field{'s' if fields != 1 else ''} but the "
                         f"header names {len(file_columns)} columns (a missing separator, or a line cut short?); "
                         f"pandas reads the missing fields as empty{_quoted_break_hint(block)}") from e
    # in the first file's order, whatever this file's (its --exclude'd columns may differ)
    keep = [c for c in file_columns if c in df.columns and c not in set(schema.excluded)]
    return df[keep + [c for c in df.columns if c not in keep and c not in set(schema.excluded)]]


def _ids_changed(text: pd.Series, block: Block, name: str, dtype: str = "int64") -> None:
    """Refuse ids that a number would change (``00042``, ``2.50``) in a column read as numbers of ``dtype``: the
    rows sampled at the start of the input held none, so its ids are numbers, and 00042 would have been carried
    as 42, 2.50 as 2.5."""
    changed = changed_as_numbers(text, dtype)
    if changed.any():
        locate = _locate(block)
        shown = [f"{v!r} at {locate(i)} (as a number: {written_back(str(v).strip(), dtype)})"
                 for i, v in text[changed].head(3).items()]
        more = f" ({int(changed.sum())} rows)" if changed.sum() > 3 else ""
        raise InputError(
            f"{block.uri}: id column {name!r} has ids that would change as numbers: {', '.join(shown)}{more}; the "
            f"ids in the rows sampled at the start of the input (the first {SAMPLE_ROWS}) are plain numbers, so the "
            "column is read as numbers: to keep the ids as written, have such an id among the first rows (e.g. sort "
            "the rows by id), or write the input as Parquet with the id column as text"
        )


def _short_line(block: Block, n_columns: int) -> tuple[int, int] | None:
    """The first data row of a CSV block with fewer fields than the header, as (row index in the block, fields).

    pandas fills a short line's missing fields with nulls, which validation then reports as missing values
    (and suggests the impute application); read again only when validation has failed.
    """
    import csv

    fs, path = url_to_fs(block.uri)
    with storage_op("read", block.uri):
        if block.length is None:
            with fs.open(path, "rb", compression=block.compression) as f:
                data = f.read()
        else:
            data = _block_bytes(fs, path, block)
    rows = (r for r in csv.reader(io.StringIO(data.decode("utf-8", errors="replace"))) if r)  # pandas skips blank lines
    if block.length is None or block.offset == 0:
        next(rows, None)  # the header
    for i, row in enumerate(rows):
        if len(row) < n_columns:
            return i, len(row)
    return None


def _meta(source: TableSource) -> pd.DataFrame:
    ts = source.schema
    cols: dict[str, pd.Series] = {}
    for name in source.columns:
        if name in ts.excluded:
            continue
        if name in ts.feature_names:
            spec = next(c for c in ts.features if c.name == name)
            cols[name] = pd.Series([], dtype="float64" if spec.kind == "numeric" else "str")
        elif name == ts.id:
            cols[name] = pd.Series([], dtype=ts.id_dtype or "str")
        elif name == ts.label:
            cols[name] = pd.Series([], dtype=ts.label_dtype or "str")
    return pd.DataFrame(cols)


def to_dask(source: TableSource) -> dd.DataFrame:
    """A lazy Dask DataFrame over the source: one partition per block, in input order."""
    return dd.from_map(
        read_block,
        list(source.blocks),
        schema=source.schema,
        # not `columns=`: from_map takes that as a selection of meta's columns (excluded ones are not in it)
        file_columns=source.columns,
        meta=_meta(source),
        enforce_metadata=False,
        label="aeflow-load",
    )


@task(name="inspect-input", **IO_TASK)
def inspect_input(
    uri: str, load: LoadConfig, allow_nulls: bool = False, schema: TableSchema | None = None, role: str = "input"
) -> TableSource:
    """Prefect task over :func:`inspect_table` (retried on transient storage errors only)."""
    return inspect_table(uri, load, allow_nulls=allow_nulls, schema=schema, role=role)


def with_schema(source: TableSource, schema: TableSchema) -> TableSource:
    return replace(source, schema=schema)
