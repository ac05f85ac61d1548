"""Secrets never leave the process: credentials in URIs are refused, anything secret-looking is redacted.

Keys belong in the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), a
profile or a Prefect block, never in a URI: a URI is echoed in messages, logs, Prefect
parameters, flow-run names and manifests. So

- :func:`find_credentials` tells what kind of secret a value holds (without repeating it);
  every configuration string is checked with it (``tasks/config.py``), and a hit is a
  configuration error (exit 2) before anything runs, so it is never retried either;
- :func:`redact` masks what looks secret in any text: URI user info
  (``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``), ``password=...``-style options,
  AWS access key ids, and the values of secret environment variables
  (``AWS_SECRET_ACCESS_KEY`` and any variable named like a password, token or key);
- :class:`RedactingFilter`, installed on every logging handler by
  :func:`install_log_redaction` (the CLI at start, every flow run at its start), applies
  :func:`redact` to log messages and tracebacks before any handler (console, Prefect's API
  log handler) sees them.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"

# scheme://user[:password]@host — the user info part of a URI (RFC 3986). A password may hold '/'
# (AWS secret keys do), so "user:...@" matches up to the '@' whatever it holds.
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s'\"@/:]*:[^\s'\"@]*|[^\s'\"@/:?#]+)@"
)
_SECRET_WORDS = r"password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?|signature"
# key=value / key: value / "key": "value" where the key names a secret (a URI option, a header, JSON).
_KEY_VALUE = re.compile(
    r"(?i)(?P<key>\b[\w.-]*(?:" + _SECRET_WORDS + r")[\w.-]*)(?P<q>[\"']?)(?P<sep>\s*[=:]\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s&;,'\"}\]]+)"
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{16}\b")
_SECRET_ENV_NAME = re.compile(r"(?i)(secret|password|passwd|token|_key$|^aws_access_key_id$|api_key|credential)")
_MIN_ENV_SECRET = 8  # shorter values ("x", "test") would mask ordinary words


def _env_secrets() -> list[str]:
    """Values of secret environment variables, longest first (read at each call: no import-time state)."""
    values = {v for k, v in os.environ.items() if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def find_credentials(value: str) -> str | None:
    """What kind of secret ``value`` holds (``"user info (user:password@)"``...), or None.

    The answer never contains the secret itself, so it can go into an error message.
    """
    if _USERINFO.search(value):
        return "credentials in the URI (user info before '@')"
    # Options of a URI (its query); a path segment such as Hive's token=5/ is data, not a secret.
    m = _KEY_VALUE.search(value.split("?", 1)[1]) if "?" in value else None
    if m:
        return f"a secret-looking option ({m.group('key')!r})"
    if _AWS_KEY_ID.search(value):
        return "an AWS access key id"
    return None


def refuse_credentials(value: str, what: str) -> str:
    """``value`` unchanged, or a :class:`~tasks.errors.ConfigError` (exit 2) that does not repeat the secret.

    For URIs that do not pass through the config models (``aeflow compress FILES``...).
    """
    found = find_credentials(value)
    if found:
        from tasks.errors import ConfigError

        raise ConfigError(
            f"{what} {redact(value)} holds {found}; remove it and give keys through the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), a profile or a Prefect block, never in a URI"
        )
    return value


def redact(text: str) -> str:
    """``text`` with URI user info, secret-looking options, AWS key ids and secret env values masked."""
    if not text:
        return text
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    out = _KEY_VALUE.sub(lambda m: f"{m.group('key')}{m.group('q')}{m.group('sep')}{MASK}", out)
    out = _AWS_KEY_ID.sub(MASK, out)
    for secret in _env_secrets():
        out = out.replace(secret, MASK)
    return out


def redact_obj(obj: Any) -> Any:
    """Every string inside ``obj`` (dicts, lists, tuples) redacted; other values unchanged."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """A handler filter that redacts a record's message and traceback before it is emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string is the handler's problem, not ours
            return True
        clean = redact(msg)
        if record.exc_info and record.exc_info[1] is not None:
            tb = logging.Formatter().formatException(record.exc_info)
            clean_tb = redact(tb)
            if clean_tb != tb:
                # Handlers that render exc_info themselves (rich) would show the secret: keep the text only.
                clean, record.exc_info, record.exc_text = f"{clean}\n{clean_tb}", None, None
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


def install_log_redaction() -> None:
    """Add :class:`RedactingFilter` to every handler of the root logger and of every named logger."""
    loggers = [logging.getLogger()] + [
        lg for lg in (logging.getLogger(n) for n in list(logging.root.manager.loggerDict)) if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in lg.handlers:
            if not any(isinstance(f, RedactingFilter) for f in h.filters):
                h.addFilter(RedactingFilter())
