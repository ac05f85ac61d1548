"""Dates, URI templates and model references for scheduled runs and backfills.

A deployment's parameters (``prefect.yaml``) and ``aeflow backfill --input-template``
may hold URI templates such as ``s3://bucket/raw/{date}/*.parquet``. At run time
they are filled from the run's date: the flow's ``date`` parameter when given,
otherwise the flow run's *scheduled* start time (so a late or retried nightly
run still reads the partition of the night it was scheduled for) in the
``timezone`` parameter's zone.

Template fields (any of them may carry a strftime format: ``{date:%Y/%m/%d}``):

========================  ==================================================
``{date}``                the run date, ``YYYY-MM-DD``
``{yesterday}``           the day before, ``YYYY-MM-DD`` (nightly runs of the previous day)
``{tomorrow}``            the day after
``{week_ago}``            seven days before
``{year}`` ``{month}`` ``{day}``  zero-padded parts of the run date
``{date_nodash}``         ``YYYYMMDD``
========================  ==================================================

Braces that are not one of these fields are left as they are. ``model_run: latest``
names the newest complete run of the same application under the same artifact
root that trained a model (train weekly, apply nightly).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel

from tasks.errors import ConfigError, StorageError

LATEST = "latest"

_FIELD_RE = re.compile(r"\{(date|yesterday|tomorrow|week_ago|year|month|day|date_nodash)(?::([^{}]*))?\}")


def template_fields(day: dt.date) -> dict[str, Any]:
    """The values of every template field for one run date."""
    return {
        "date": day,
        "yesterday": day - dt.timedelta(days=1),
        "tomorrow": day + dt.timedelta(days=1),
        "week_ago": day - dt.timedelta(days=7),
        "year": f"{day.year:04d}",
        "month": f"{day.month:02d}",
        "day": f"{day.day:02d}",
        "date_nodash": day.strftime("%Y%m%d"),
    }


# strftime's directives (Python's and the C library's), with the C library's flags (%-d): the letters after %
_DIRECTIVE_RE = re.compile(r"%[-_0^#]?(.)")
_STRFTIME_LETTERS = set("aAwdbBmyYHIpMSfzZjUWcxXGuV%eCDFghnrRtTklsP:")


def has_template(value: str) -> bool:
    """Whether ``value`` holds at least one date field."""
    return bool(_FIELD_RE.search(value))


def render(template: str, day: dt.date) -> str:
    """Fill the date fields of ``template`` for ``day``; other braces are kept.

    >>> render("s3://b/raw/{date}/*.csv", dt.date(2026, 11, 26))
    's3://b/raw/2026-11-26/*.csv'
    >>> render("data/{yesterday:%Y/%m/%d}.parquet", dt.date(2026, 11, 1))
    'data/2026/10/31.parquet'
    """
    values = template_fields(day)

    def fill(m: re.Match[str]) -> str:
        value, spec = values[m.group(1)], m.group(2)
        if spec and isinstance(value, dt.date):
            unknown = [d for d in _DIRECTIVE_RE.findall(spec) if d not in _STRFTIME_LETTERS]
            if unknown:  # the C library writes an unknown %Q as it is: every date read the same literal path
                raise ConfigError(f"template {template!r}: bad format {m.group(0)!r}: %{unknown[0]} is no strftime "
                                  "directive (e.g. %Y, %m, %d)")
        try:
            return format(value, spec) if spec else str(value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"template {template!r}: bad format {m.group(0)!r}: {e}") from e

    return _FIELD_RE.sub(fill, template)


def parse_date(value: str | dt.date | dt.datetime) -> dt.date:
    """A date from ``YYYY-MM-DD`` (or a date/datetime), with a clear error."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    try:
        return dt.date.fromisoformat(text)
    except ValueError as e:
        import re

        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):  # the right shape, not a day of the calendar
            raise ConfigError(f"invalid date {value!r}: not a day of the calendar ({e})") from e
        raise ConfigError(f"invalid date {value!r}: expected YYYY-MM-DD") from e


def date_range(start: dt.date, end: dt.date, step_days: int = 1) -> list[dt.date]:
    """Every ``step_days``-th date from ``start`` to ``end``, both included."""
    if end < start:
        raise ConfigError(f"end date {end} is before start date {start}")
    if step_days < 1:
        raise ConfigError(f"step must be at least one day, got {step_days}")
    n = (end - start).days // step_days + 1
    return [start + dt.timedelta(days=i * step_days) for i in range(n)]


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError(f"unknown time zone {name!r} (use an IANA name such as 'Europe/Berlin' or 'UTC')") from e


def run_date(date: str | dt.date | None = None, timezone: str = "UTC") -> dt.date:
    """The date a run works on: ``date`` when given, else the scheduled start time's date.

    The scheduled start time comes from ``prefect.runtime.flow_run`` (a scheduled
    run's slot; for a run started by hand it is its creation time), converted to
    ``timezone``. Outside a flow run it is now.
    """
    if date is not None and date != "":
        return parse_date(date)
    tz = zone(timezone)
    when: dt.datetime | None = None
    try:
        from prefect.runtime import flow_run

        when = flow_run.scheduled_start_time
    except Exception:  # not in a flow run
        when = None
    if when is None:
        when = dt.datetime.now(dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(when.timestamp(), tz).date()


def _render_strings(obj: Any, day: dt.date) -> Any:
    if isinstance(obj, str):
        return render(obj, day) if has_template(obj) else obj
    if isinstance(obj, dict):
        return {k: _render_strings(v, day) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_render_strings(v, day) for v in obj)
    return obj


def config_has_templates(config: BaseModel) -> bool:
    found: list[bool] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, str):
            found.append(has_template(obj))
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)

    walk(config.model_dump(mode="json"))
    return any(found)


def render_config(config: BaseModel, day: dt.date) -> BaseModel:
    """A copy of ``config`` with every templated string filled for ``day``."""
    data = _render_strings(config.model_dump(mode="json"), day)
    return type(config).model_validate(data)


def latest_model_run(app: str, output: str) -> str:
    """URI of the newest complete run of ``app`` under ``output`` that trained its model."""
    from tasks.storage import ArtifactStore

    found = ArtifactStore(output).newest_run(app, lambda m: not m.model_run)  # newest first: see newest_run
    if found is not None:
        return found.run_uri
    raise StorageError(
        f"model_run is {LATEST!r} but {output!r} holds no complete {app} run that trained a model; "
        f"run a training of {app} that writes there first (`aeflow run {app} --output {output} ...`, or its "
        f"deployment with that output; under `aeflow serve` also the {app}-train-apply deployment)"
    )


def prepare_config(config: Any, date: str | dt.date | None = None, timezone: str = "UTC") -> tuple[Any, dt.date | None]:
    """Fill templates and resolve ``model_run: latest``; return the config and the date used.

    The date is ``None`` when the config has no template and no date was given.
    ``output`` and ``dask_address`` left unset come from ``AEFLOW_OUTPUT`` and
    ``AEFLOW_DASK_ADDRESS`` (``tasks/execution.py``), read here, when the run starts.
    """
    from tasks.execution import with_environment_defaults

    config = with_environment_defaults(config)
    day: dt.date | None = None
    if (date is not None and date != "") or config_has_templates(config):
        day = run_date(date, timezone)
        config = render_config(config, day)
    if getattr(config, "model_run", None) == LATEST:
        config = config.model_copy(update={"model_run": latest_model_run(config.app_name, config.output)})
    return config, day
