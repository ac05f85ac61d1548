"""``python -m flows.cli``: the same as the ``aeflow`` console script."""

from flows.cli import main

main()
