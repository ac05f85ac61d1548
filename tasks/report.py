"""Reports: plots (PNG), the Markdown summary, and the Prefect artifacts of a run."""

from __future__ import annotations

import io
import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tasks.storage import RunDir

log = logging.getLogger("aeflow.report")


def save_figure(run: RunDir, rel: str, fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    run.write_bytes(rel, buf.getvalue())
    return rel


def training_curve(run: RunDir, history: list[Any], rel: str = "report/training.png") -> str | None:
    if not history:
        return None
    epochs = [h.epoch if hasattr(h, "epoch") else h["epoch"] for h in history]
    tr = [h.train_loss if hasattr(h, "train_loss") else h["train_loss"] for h in history]
    va = [h.val_loss if hasattr(h, "val_loss") else h["val_loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, tr, label="train")
    ax.plot(epochs, va, label="validation")
    best = int(np.argmin(va))
    ax.axvline(epochs[best], color="grey", ls=":", label=f"best epoch {epochs[best]}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Training")
    return save_figure(run, rel, fig)


def scatter_2d(
    run: RunDir,
    z: np.ndarray,
    labels: np.ndarray | None,
    rel: str,
    title: str,
    max_points: int = 5000,
    seed: int = 0,
) -> str:
    """A 2-D scatter of codes, coloured by label when there is one."""
    if len(z) > max_points:
        idx = np.random.default_rng(seed).choice(len(z), max_points, replace=False)
        z = z[idx]
        labels = labels[idx] if labels is not None else None
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is not None:
        uniq = list(dict.fromkeys(labels.tolist()))
        if len(uniq) <= 20:
            cmap = plt.get_cmap("tab10" if len(uniq) <= 10 else "tab20")
            for i, u in enumerate(sorted(uniq, key=str)):
                m = labels == u
                ax.scatter(z[m, 0], z[m, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=str(u))
            ax.legend(markerscale=2, fontsize=7, loc="best", ncol=2 if len(uniq) > 10 else 1)
        else:
            sc = ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.7, c=labels.astype(float), cmap="viridis")
            fig.colorbar(sc, ax=ax)
    else:
        ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.6)
    ax.set_title(title)
    return save_figure(run, rel, fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def metrics_rows(metrics: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One row per metric: ours and each baseline side by side."""
    names = list(metrics)
    for b in baselines.values():
        names += [k for k in b if k not in names]
    rows = []
    for name in names:
        row = {"metric": name, "aeflow": _fmt(metrics.get(name))}
        for bname, bvals in baselines.items():
            row[bname] = _fmt(bvals.get(name))
        rows.append(row)
    return rows


def markdown_summary(
    app: str,
    run_uri: str,
    metrics: dict[str, Any],
    baselines: dict[str, dict[str, Any]],
    outputs: dict[str, str],
    notes: list[str],
    timings: dict[str, float],
) -> str:
    rows = metrics_rows(metrics, baselines)
    lines = [f"# aeflow {app}", "", f"Run: `{run_uri}`", ""]
    if rows:
        header = list(rows[0])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
        lines.append("")
    if outputs:
        lines += ["## Outputs", ""]
        lines += [f"- **{name}**: [{uri}]({uri})" for name, uri in outputs.items()]
        lines.append("")
    if timings:
        lines += ["## Stage timings (s)", ""]
        lines += [f"- {k}: {v:.2f}" for k, v in timings.items()]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def publish_artifacts(app: str, run_uri: str, rows: list[dict[str, str]], summary_md: str) -> None:
    """Prefect artifacts (metrics table, Markdown summary). Skipped outside a flow run."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        if not (FlowRunContext.get() or TaskRunContext.get()):
            return
        if rows:
            create_table_artifact(table=rows, key=f"{app}-metrics", description=f"{app} metrics vs baselines ({run_uri})")
        create_markdown_artifact(markdown=summary_md, key=f"{app}-summary", description=f"{app} run summary")
    except Exception as e:  # artifacts are for people; a failure to post one must not fail the run
        log.warning("could not publish Prefect artifacts: %s", e)
