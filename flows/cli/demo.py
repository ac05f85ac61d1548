"""``aeflow demo``: every application on the bundled sample data, with a headline table."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from flows.cli.common import err, execute, out


def summary_table(data_names: tuple[str, ...] = ()) -> Table:
    """The demo's closing table. Metric names and numbers stay whole on one line (at 80 columns
    "average_precision (↑)" was folded to "average_precisio" over "n (↑)"); the data and baseline
    columns wrap at spaces instead, the data column never inside a word of ``data_names``."""
    summary = Table(title="aeflow demo: headline metrics (aeflow and the best baseline, on the same data)",
                    title_justify="left", pad_edge=False)  # the 2 columns that let it fit 80 wide, borders included
    words = max((len(w) for name in data_names for w in name.split()), default=None)
    for col in ("app", "data", "metric", "aeflow", "best baseline"):
        summary.add_column(col, overflow="fold", justify="right" if col == "aeflow" else "left",
                           no_wrap=col in ("app", "metric", "aeflow"), min_width=words if col == "data" else None)
    return summary


def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Artifact root for the demo runs.")] = "./artifacts",
    quick: Annotated[bool, typer.Option(help="Fewer epochs, for a fast look.")] = False,
) -> None:
    """Build the sample data and run every application on it; print a summary with the run URIs."""
    from flows.demo import demo_jobs, headline_rows

    jobs = list(demo_jobs(output, quick))
    summary = summary_table(tuple(job.data for job in jobs))
    run_uris: list[tuple[str, str, str]] = []
    failures = 0
    for job in jobs:
        err.rule(f"{job.app} on {job.data}")
        try:
            result = execute(job.app, job.options, None, None)
        except Exception as e:
            failures += 1
            err.print(f"[red]{job.app} on {job.data} failed:[/] {e}")
            summary.add_row(job.app, job.data, "failed", "", str(e)[:80])
            continue
        for i, (metric, ours, best) in enumerate(headline_rows(job.app, result.metrics, result.baselines)):
            summary.add_row(job.app if i == 0 else "", job.data if i == 0 else "", metric, ours, best, end_section=False)
        summary.add_section()
        run_uris.append((job.app, job.data, result.run_uri))
    out.print(summary)
    for app_name, data, uri in run_uris:
        out.print(f"  {app_name} ({data}): {uri}", highlight=False, soft_wrap=True)
    out.print(f"All metrics: aeflow runs show RUN_URI; list them with: aeflow runs list --output {output}")
    if failures:
        raise typer.Exit(1)
