"""Domain errors: one clear message for the user, no traceback.

Every error a user can cause by what they pass (a file, a column, a value, an
option) is an :class:`AeflowError`. The CLI prints its message and exits with
:attr:`AeflowError.exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import ClassVar


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the command (``kill``, systemd, a container's stop): it unwinds as Ctrl-C does
    (``flows.cli.common.sigterm_as_interrupt``), then exits 143 instead of 130."""


class AeflowError(Exception):
    """Base class of errors caused by the user's input or configuration."""

    exit_code = 1
    # Whether retrying the same operation later may succeed (an outage, not bad input):
    # Prefect task retries retry these, and only these, of the errors aeflow raises.
    transient: ClassVar[bool] = False

    @classmethod
    def family(cls) -> list[type]:
        """This class and all its subclasses (to recognise user errors by name in logs)."""
        out, todo = [], [cls]
        while todo:
            c = todo.pop()
            out.append(c)
            todo.extend(c.__subclasses__())
        return out


class InputError(AeflowError):
    """The input data is missing, unreadable or violates the schema."""

    exit_code = 3


class ConfigError(AeflowError):
    """An option or configuration value is invalid."""

    exit_code = 2


class TrainingDiverged(ConfigError):
    """Training's loss became NaN or infinite (a learning rate too high for the model and data): a setting to
    change, not a bug (it was reported as one, with Prefect's tracebacks)."""


class PortInUse(ConfigError):
    """A port that a server of aeflow's is to listen on is held by another program.

    Found before anything starts (``aeflow serve``, ``aeflow platform up``): the fix is the
    option that moves the port, or freeing it, so it is refused as a setting (exit 2).
    """


class StorageError(AeflowError):
    """The artifact store cannot be read or written (bucket, permissions, missing run)."""

    exit_code = 4


class StorageUnavailable(StorageError):
    """The object store cannot be reached (connection refused, timeout, 5xx): worth retrying."""

    transient = True


class ModelMismatchError(AeflowError):
    """The data does not fit the model it is applied with (columns, app, shape)."""

    exit_code = 5


class PlatformError(AeflowError):
    """A component of ``aeflow platform`` could not be started, reached or stopped."""

    exit_code = 6
