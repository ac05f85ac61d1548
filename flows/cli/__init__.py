"""The ``aeflow`` command line: ad-hoc runs, run listing, search, codec files, serving, backfills, the demo.

One module per command group, joined here: ``run`` (one command per registered
application, generated from the registry), ``runs``, ``search``, ``codec``
(compress/decompress), ``serve``, ``backfill``, ``demo``, ``sample_data``, and
``platform`` (its sub-app lives in ``flows/platform/cli.py``). Command
bodies are thin; their logic lives in ``tasks/`` and ``flows/``.
"""

import os
import sys
from typing import Any

import typer

from flows.cli import backfill, codec, demo, run, runs, sample_data, search, serve
from flows.cli.run import COMMON_OPTIONS
from flows.platform.cli import platform_app


def _no_type_beside_flags() -> None:
    """Typer's rich help (0.29) prints ``<bool>`` beside every flag (``--json``, ``--help``...), which takes
    no value: shown without it, as its plain help does. Other options keep their type (``<int>``, ``<str>``)."""
    from typer import core

    option = getattr(core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "aeflow", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return shown(self, ctx)

    display_type_rich.aeflow = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich  # type: ignore[union-attr]


_no_type_beside_flags()


def build_app() -> typer.Typer:
    """The whole command line, with an ``aeflow run APP`` command for every application registered now."""
    root = typer.Typer(
        name="aeflow",
        help="Autoencoder applications as Prefect-orchestrated batch jobs.",
        no_args_is_help=True,
        rich_markup_mode="rich",
        pretty_exceptions_enable=False,
    )
    root.add_typer(run.lazy(), name="run")
    root.add_typer(runs.app, name="runs")
    root.command("search")(search.search)
    root.command("compress")(codec.compress)
    root.command("decompress")(codec.decompress)
    root.command("sample-data")(sample_data.sample_data)
    root.command("demo")(demo.demo)
    root.command("serve")(serve.serve)
    root.command("backfill")(backfill.backfill)
    root.add_typer(platform_app, name="platform")
    return root


app = build_app()

EPHEMERAL_STARTUP_TIMEOUT_S = 180  # seconds the temporary Prefect server may take to start (see main)

__all__ = ["COMMON_OPTIONS", "app", "build_app", "main"]


def main() -> None:
    from flows.lifeline import guard_prefect_ephemeral_server, shorten_prefect_server_notice
    from tasks.redaction import install_log_redaction

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Prefect's temporary API server (no PREFECT_API_URL) must answer within 20 s, Prefect's default: on a
    # busy machine (load 4-10, two cores) its start-up took longer and every command failed with a
    # traceback. A slow start is not a failure; one that never answers still fails, after this long.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    guard_prefect_ephemeral_server()  # a killed CLI leaves no temporary Prefect server behind
    shorten_prefect_server_notice()
    install_log_redaction()
    if not sys.argv[1:] or "--help" in sys.argv[1:]:
        app()  # help runs no flow: not worth importing Prefect (a second) for its settings
        return
    from tasks.prefect_utils import no_default_flow_heartbeats

    with no_default_flow_heartbeats():  # a second per flow run otherwise, for nothing watching
        app()


if __name__ == "__main__":
    main()
