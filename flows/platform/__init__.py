"""``aeflow platform``: the shared installation, brought up on one machine without Docker.

PostgreSQL, the Prefect server on it, SeaweedFS as the S3 object store, a Dask
scheduler with its workers, Prefect workers on the ``aeflow-process`` work pool and
a watchdog, each a process of its own (own session, own log) recorded in
``DIR/platform.json``. :mod:`flows.platform.core` has ``up``/``status``/``down``,
:mod:`flows.platform.components` how each component starts and is checked,
:mod:`flows.platform.cli` the typer sub-app.
"""
