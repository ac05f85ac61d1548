"""The applications: one module each, one contract (``tasks/apps/base.py``).

``base`` holds the :class:`Application` ABC, its context and fitted state, the
registry and the stage tasks; ``kinds`` the data kinds (tables, images);
``tabular`` and ``images_base`` the two families' shared bases. Each other
module is one application, registered by name.
"""

from tasks.apps.base import (
    APP_MODULES,
    Application,
    Context,
    Evaluation,
    Fitted,
    apply_task,
    evaluate_task,
    fit_started,
    fit_task,
    forget_fit_started,
    get_app,
    load_all,
    register,
    report_task,
)

__all__ = [
    "APP_MODULES",
    "Application",
    "Context",
    "Evaluation",
    "Fitted",
    "apply_task",
    "evaluate_task",
    "fit_started",
    "fit_task",
    "forget_fit_started",
    "get_app",
    "load_all",
    "register",
    "report_task",
]
