"""What `--help` says an option defaults to is what the configuration defaults to.

`aeflow run APP --dask-address` said "(default: a LocalCluster)", but a run whose config leaves it unset takes
$AEFLOW_DASK_ADDRESS (which `eval "$(aeflow platform up)"` exports) first, as --output takes $AEFLOW_OUTPUT
(found by the help audit). These tests read every option's help as `aeflow run APP --help`, `aeflow backfill
--help` and `aeflow platform up --help` print it, and compare any literal default it states with the
configuration's, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from flows.cli.run import option_specs
from tasks.apps import load_all
from tasks.execution import DASK_ENV, OUTPUT_ENV

APPS = load_all()
# "(default 16; ...)", "(default: keep)", "default 1)": a literal value right after "default", ended by ) ; or ,
STATED = re.compile(r"\bdefault:? ([\w.-]+)(?=[);,])")
# config paths whose unset value is taken from the environment when a run starts (tasks/execution.py)
FROM_ENV = {"output": OUTPUT_ENV, "dask_address": DASK_ENV}


def _default_at(config: Any, path: str) -> Any:
    for key in path.split("."):
        config = getattr(config, key)
    return config


def _same(stated: str, value: Any) -> bool:
    if isinstance(value, bool):
        return stated.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(stated) == float(value)
        except ValueError:
            return False
    return stated == str(value)


@pytest.mark.parametrize("name", sorted(APPS))
def test_run_help_states_the_configs_defaults(name):
    application = APPS[name]
    config = application.RunConfig()
    wrong = []
    for _param, flags, path, _typ, help_ in option_specs(application):
        value = _default_at(config, path)
        if value is None:  # chosen at run time ("default: the middle level", "default: estimated")
            continue
        for stated in STATED.findall(help_):
            if not _same(stated, value):
                wrong.append(f"{flags[0]}: help says default {stated!r}, {path} defaults to {value!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(APPS))
def test_run_help_names_the_environment_a_default_comes_from(name):
    for _param, flags, path, _typ, help_ in option_specs(APPS[name]):
        if path in FROM_ENV:
            assert f"${FROM_ENV[path]}" in help_, f"{name} {flags[0]}: {help_!r} does not name ${FROM_ENV[path]}"


def _params(*argv: str) -> dict[str, Any]:
    import typer

    from flows.cli import app

    command = typer.main.get_command(app)
    for word in argv:
        command = command.get_command(None, word)  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


def test_backfill_help_names_the_environment_a_default_comes_from():
    """In the command's text: at 80 columns backfill's option column is too narrow for $AEFLOW_DASK_ADDRESS."""
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["backfill", "--help"], terminal_width=80)
    text = " ".join(res.output.replace("│", " ").split())
    for env in (OUTPUT_ENV, DASK_ENV):
        assert f"${env}" in text, f"backfill --help does not name ${env}:\n{res.output}"


def test_platform_up_help_states_the_platforms_defaults():
    from flows.platform.core import DEFAULTS

    wrong = []
    for name, param in _params("platform", "up").items():
        value = DEFAULTS.get(name)
        if value is None:
            continue
        for stated in STATED.findall(param.help or ""):
            if not _same(stated, value):
                wrong.append(f"--{name}: help says default {stated!r}, DEFAULTS[{name!r}] is {value!r}")
    assert not wrong, "\n".join(wrong)


def _list_stubs(lines: list[str]) -> list[str]:
    items = [i for i, line in enumerate(lines) if line.startswith("- ")]
    assert len(items) >= 3, "\n".join(lines)
    stubs = []
    for line in lines[items[0]:]:
        if not line:
            break
        if not line.startswith(("- ", "  ")):
            stubs.append(line)
    return stubs


def test_list_paragraphs_wrap_with_a_hanging_indent():
    """`aeflow run detect --help` at 80 columns broke its list items' source lines in the middle: "many" alone
    at the margin, then the next source line. Every line of a list item after its first now carries the
    item's indent, and none is longer than the terminal."""
    from typer.testing import CliRunner

    from flows.cli import app

    out = CliRunner().invoke(app, ["run", "detect", "--help"], env={"COLUMNS": "80"}).output
    assert not _list_stubs([line[1:].rstrip() for line in out.splitlines()]), out  # rich draws one column in
    assert max(len(line) for line in out.splitlines()) <= 80


@pytest.mark.parametrize("width", [40, 57, 117])
def test_reflow_wraps_list_items_to_the_width(width):
    import sys

    from flows.cli.run import _reflow

    doc = _reflow(sys.modules[type(APPS["detect"]).__module__].__doc__.strip().replace("``", ""), width)
    lines = doc.splitlines()
    assert not _list_stubs(lines), doc
    assert max(len(line) for line in lines if not line.startswith(("- ", "  "))) > width  # plain: the terminal's
    assert max(len(line) for line in lines if line.startswith(("- ", "  "))) <= width


def test_readme_epochs_says_that_detect_trains_a_small_table_for_more():
    """detect's --help and its notes say a small table trains for more epochs than --epochs (app.min_steps); the
    README's --epochs did not."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    common = " ".join(readme[readme.index("Common options of `aeflow run APP`"):readme.index("Application options")].split())
    said = common[common.index("`--epochs` (the most"):]
    said = said[:said.index(")")]
    assert f"`app.min_steps` = {APPS['detect'].Config().min_steps} optimiser steps" in said, said
    assert "app.min_steps" in APPS["detect"].option_help["epochs"]
