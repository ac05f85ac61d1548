"""``aeflow search``: the nearest images of each query in an index run."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli.common import err, fail, out
from tasks.errors import AeflowError, ConfigError


def search(
    index: Annotated[str, typer.Option("--index", help="URI of an index run, e.g. ./artifacts/runs/index/<run_id>.")],
    query: Annotated[list[str], typer.Option("--query", help="Query image, or a folder of them (repeatable); searched in one batch.")],
    k: Annotated[int, typer.Option("--k", help="Number of neighbours per query.")] = 10,
    sheet: Annotated[str | None, typer.Option("--sheet", help="Write a contact-sheet PNG (each query and its results) to this path (ending in .png).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list: per query, its results with their squared L2 distances in code space.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out query files that are not PNG/JPEG images or do not decode (each named in a warning) instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --sheet file if it exists (default: refuse it by name before searching).")] = False,
) -> None:
    """Find the k nearest images of each query in an index built by `aeflow run index`."""
    from tasks.codec_files import check_new_file
    from tasks.search import (
        expand_queries,
        open_index,
        read_queries,
        write_search_sheet,
    )
    from tasks.search import search as search_index

    try:
        if sheet:  # before searching: a --sheet that cannot be written fails alone, not after the results
            check_new_file(sheet, f"--sheet {sheet}", overwrite)
            if not sheet.lower().endswith(".png"):  # it is PNG bytes: a .jpg name would hold a PNG
                raise ConfigError(f"--sheet {sheet}: the contact sheet is a PNG image; give a name ending in .png")
        queries, left_out = expand_queries(query, skip_bad)
        loaded = open_index(index)
        queries, arrays, undecodable = read_queries(queries, loaded.meta, skip_bad)
        left_out += undecodable
        if left_out:  # never silently: what --skip-bad left out, by name (stderr, so --json stays parseable)
            err.print(f"[bold yellow]warning:[/] --skip-bad left out {len(left_out)} query file"
                      f"{'s' if len(left_out) > 1 else ''}:", highlight=False, soft_wrap=True)
            for line in left_out:
                err.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
        hits, arrays = search_index(loaded, queries, k, arrays=arrays)
        if not as_json:  # the results before the sheet: a sheet that fails to write (keys that may only read, an
            _print_hits(queries, hits)  # outage) no longer takes the finished search's results with it
        if sheet:
            write_search_sheet(sheet, loaded, queries, arrays, hits)
    except AeflowError as e:
        fail(e)
    if as_json:  # one JSON document on stdout: the list, or (failed) the error object
        print(json.dumps([{"query": q, "results": [h.__dict__ for h in row]} for q, row in zip(queries, hits, strict=True)]))
        return
    if sheet:
        out.print(f"contact sheet: {sheet}", highlight=False, soft_wrap=True)


def _print_hits(queries: list[str], hits: list) -> None:
    for q, row in zip(queries, hits, strict=True):
        table = Table(title=f"nearest to {q}", title_justify="left")
        for col in ("rank", "distance", "label", "image"):
            table.add_column(col, justify="right" if col in ("rank", "distance") else "left", overflow="fold")
        for h in row:
            table.add_row(str(h.rank), f"{h.distance:.4g}", h.label, h.path)
        out.print(table)
