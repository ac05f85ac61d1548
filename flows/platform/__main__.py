"""``python -m flows.platform up|status|down``: the same commands as ``aeflow platform``, without loading the applications."""

from flows.platform.cli import platform_app

platform_app(prog_name="aeflow platform")
