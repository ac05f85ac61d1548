"""``aeflow run APP``: one command per registered application, generated from the registry.

Every application gets the common options its data kind accepts (tables: columns;
images: folders) plus its own ``cli_options``; each option maps to one config path.
"""

from __future__ import annotations

import inspect
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from flows.cli.common import execute, fail, print_result, quiet_prefect, sigterm_as_interrupt
from tasks.errors import AeflowError, ConfigError

# (parameter name, flag(s), config path, type, help). Every application gets those its data kind accepts.
COMMON_OPTIONS: tuple[tuple[str, tuple[str, ...], str | None, Any, str], ...] = (
    ("input", ("--input", "-i"), "load.input", str, "Training data: CSV/Parquet file, folder or glob; local or s3://."),
    ("apply_to", ("--apply-to",), "load.apply_to", str, "Data to apply the model to (default: the input)."),
    ("model", ("--model", "-m"), "model_run", str,
     ("Reuse a trained model instead of training: a run's URI, latest (the newest run of this app under --output "
      "that trained one) or a model folder (config.json + weights.safetensors). Settings that only shape a fit "
      "(e.g. --epochs, --latent-dim, detect's --contamination) then do not apply, and the run's notes name those "
      "given (extract's evaluation still trains with the model and training settings).")),
    ("output", ("--output", "-o"), "output", str, "Artifact root: a folder or s3://bucket/prefix (default $AEFLOW_OUTPUT, else ./artifacts)."),
    ("label_column", ("--label-column",), "load.label_column", str, "Column kept out of training (reduce colours its plot by it; extract and detect score against it)."),
    ("id_column", ("--id-column",), "load.id_column", str, "Column carried through to every output table."),
    ("exclude", ("--exclude",), "load.exclude_columns", list[str], "Column to ignore (repeatable)."),
    ("file_format", ("--format",), "load.format", str, "csv, parquet or auto (by extension)."),
    ("hidden", ("--hidden",), "model.hidden", str, "Encoder widths, comma separated, e.g. 1500 or 256,128 (none: a linear autoencoder)."),
    ("epochs", ("--epochs",), "train.epochs", int, "Maximum epochs (early stopping usually ends sooner)."),
    ("batch_size", ("--batch-size",), "train.batch_size", int,
     ("Training batch size (default: train.default_batch_size on CPU; on CUDA a multiple of it that fills the "
      "device, --lr scaled with it).")),
    ("lr", ("--lr",), "train.lr", float, "Adam learning rate."),
    ("patience", ("--patience",), "train.patience", int, "Early-stopping patience in epochs."),
    ("seed", ("--seed",), "train.seed", int, "Random seed of initialisation, shuffling and corruption."),
    ("device", ("--device",), "train.device", str, "auto (cuda if present, else cpu), cpu, cuda, cuda:N."),
    ("val_fraction", ("--val-fraction",), "preprocess.val_fraction", float, "Share of rows held out for validation."),
    ("dask_address", ("--dask-address",), "dask_address", str,
     "Existing Dask scheduler (default $AEFLOW_DASK_ADDRESS, else a LocalCluster)."),
    ("run_id", ("--run-id",), "run_id", str, "Name of the run directory (default: time + fingerprint)."),
)

# Options of every `aeflow run APP` command that are not config paths.
_FIXED = (
    ("config", Path | None, None, typer.Option("--config", "-c", help="YAML file with the same nesting as the config.")),
    ("set_", list[str] | None, None, typer.Option("--set", help="Override any config key: --set train.lr=3e-4 (repeatable).")),
    ("skip_existing", bool, False,
     typer.Option("--skip-existing", help="Do nothing if a complete run with the same input and config exists.")),
    ("as_json", bool, False, typer.Option("--json", help="Print one JSON object (run_uri, outputs, metrics) on stdout; "
                                                      "stderr as with --quiet (no progress: only warnings and errors).")),
    ("quiet", bool, False, typer.Option("--quiet", "-q", help="Only warnings and the result.")),
    ("show_config", bool, False,
     typer.Option("--show-config", help="Print the resolved configuration (every key --set and --config take, its value "
                  "and what it means) as YAML, usable as a --config file, and exit without running; with --json, as one "
                  "JSON object (also a --config file).")),
)


def option_specs(application: Any) -> list[tuple[str, tuple[str, ...], str, Any, str]]:
    """The (name, flags, config path, type, help) of every config option of ``aeflow run APP``."""
    kind = application.data
    accepted = application.common_options or kind.common_options
    # help texts: the data kind's, then the application's own (where an option means something else for it)
    helps = {**kind.option_help, **getattr(application, "option_help", {})}
    common = [(n, f, p, t, helps.get(n, h)) for n, f, p, t, h in COMMON_OPTIONS
              if accepted is None or n in accepted]
    extra = [(flag.lstrip("-").replace("-", "_"), (flag,), path, typ, help_)
             for flag, path, typ, help_ in application.cli_options]
    return common + extra


def options_from(specs: list[tuple[str, tuple[str, ...], str, Any, str]], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The config paths the user set on the command line, with their values."""
    options: dict[str, Any] = {}
    for name, _flags, path, _typ, _help in specs:
        value = kwargs.get(name)
        if value is None or value == []:
            continue
        if name == "hidden":
            from tasks.config import parse_widths

            try:
                value = list(parse_widths(str(value)))
            except ValueError as e:
                raise ConfigError(str(e).replace("hidden", "--hidden", 1)) from e
        options[path] = value
    if kwargs.get("skip_existing"):
        options["skip_existing"] = True
    return options


def make_command(group: typer.Typer, application: Any) -> None:
    """Add ``aeflow run <application.name>`` with its options to ``group``."""
    specs = option_specs(application)
    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[typ | None, typer.Option(*flags, help=help_, show_default=False)])
        for name, flags, _path, typ, help_ in specs
    ] + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[typ, option])
        for name, typ, default, option in _FIXED
    ]

    def command(**kwargs: Any) -> None:
        try:
            options = options_from(specs, kwargs)
        except AeflowError as e:  # one `error:` line (and --json's object), not typer's usage box
            fail(e)
        if kwargs.get("show_config"):
            from tasks.config import annotated_yaml, resolve_config

            try:
                cfg = resolve_config(application.RunConfig, file=kwargs.get("config"), options=options,
                                     sets=kwargs.get("set_"))
            except AeflowError as e:
                fail(e)
            from tasks.execution import with_environment_defaults

            # the output and scheduler the run would use ($AEFLOW_OUTPUT, $AEFLOW_DASK_ADDRESS): fed back with
            # --config, a printed default ./artifacts would count as given and send the run past $AEFLOW_OUTPUT
            shown = with_environment_defaults(cfg)
            if kwargs.get("as_json"):  # --json's one JSON object (YAML was printed: a script's json.load failed)
                import json

                sys.stdout.write(json.dumps(shown.model_dump(mode="json", exclude={"app_name"}), indent=2) + "\n")
                return
            sys.stdout.write(annotated_yaml(shown))
            return
        quiet_prefect(kwargs.get("quiet") or kwargs.get("as_json"))
        with sigterm_as_interrupt():  # `kill`, systemd, a container's stop: as Ctrl-C, exit 143
            try:
                result = execute(application.name, options, kwargs.get("config"), kwargs.get("set_"))
            except (AeflowError, Exception, KeyboardInterrupt) as e:
                fail(e)
        print_result(result, kwargs.get("as_json", False))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = f"run_{application.name}"
    doc = _reflow((sys.modules[type(application).__module__].__doc__ or "").strip().replace("``", ""))
    group.command(application.name, help=doc, no_args_is_help=True)(command)


def _reflow(doc: str, width: int | None = None) -> str:
    """The application's docstring as --help text: each plain paragraph joined into one line for the terminal
    to wrap (its source line breaks stayed, leaving ragged lines of one or two words); a list paragraph's items
    wrapped here to the terminal's width with a hanging indent (the terminal would break an item's source lines
    in the middle and leave stubs of one word at the margin)."""
    if width is None:
        # rich draws the help one column in from the edge and keeps the last one free
        width = max(40, shutil.get_terminal_size((80, 24)).columns - 3)
    out = []
    for paragraph in doc.split("\n\n"):
        lines = paragraph.splitlines()
        if not any(line.startswith(("-", " ", "*")) for line in lines[1:]):
            out.append(" ".join(line.strip() for line in lines))
            continue
        blocks: list[list[str]] = []
        for line in lines:
            if line.startswith(("- ", "* ")) or not blocks or not line.startswith(" "):
                blocks.append([line.strip()])
            else:
                blocks[-1].append(line.strip())
        out.append("\n".join(
            textwrap.fill(" ".join(block), width=width, subsequent_indent="  " if block[0].startswith(("- ", "* ")) else "",
                          break_long_words=False, break_on_hyphens=False)
            for block in blocks))
    return "\n\n".join(out)


class _LazyRunGroup(TyperGroup):
    """``aeflow run``'s commands, built from the registry when ``run`` is used: ``aeflow --help``
    and the other commands do not import the applications (PyTorch, scikit-learn, Prefect:
    seconds)."""

    _built = False

    def _build(self) -> None:
        if not self._built:
            self._built = True
            self.commands.update(typer.main.get_command(build()).commands)  # type: ignore[attr-defined]

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._build()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._build()
        return super().get_command(ctx, cmd_name)


RUN_HELP = "Run an application once (train, or reuse --model, then apply and evaluate)."


def lazy() -> typer.Typer:
    """The ``aeflow run`` group, its commands built on first use (see :class:`_LazyRunGroup`)."""
    return typer.Typer(cls=_LazyRunGroup, help=RUN_HELP, no_args_is_help=True)


def build() -> typer.Typer:
    """The ``aeflow run`` group: one command per application registered now."""
    from tasks.apps import load_all

    group = typer.Typer(help=RUN_HELP, no_args_is_help=True)
    for application in load_all().values():
        make_command(group, application)
    return group
