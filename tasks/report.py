"""Reports: plots (PNG), the Markdown summary, and the Prefect artifacts of a run."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from tasks.storage import RunDir

log = logging.getLogger("aeflow.report")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display: plots are written, never shown).

    Imported on first use, not with this module: ``aeflow run APP --help`` and a refused
    configuration need no plotting library (0.3 s of every CLI start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(run: RunDir, rel: str, fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    run.write_bytes(rel, buf.getvalue())
    return rel


def training_curve(run: RunDir, history: list[Any], rel: str = "report/training.png") -> str | None:
    if not history:
        return None
    epochs = [h.epoch if hasattr(h, "epoch") else h["epoch"] for h in history]
    tr = [h.train_loss if hasattr(h, "train_loss") else h["train_loss"] for h in history]
    va = [h.val_loss if hasattr(h, "val_loss") else h["val_loss"] for h in history]
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    marker = "o" if len(epochs) < 3 else None  # one or two epochs: a line of one point is invisible
    ax.plot(epochs, tr, label="train", marker=marker)
    ax.plot(epochs, va, label="validation", marker=marker)
    best = int(np.argmin(va))
    ax.axvline(epochs[best], color="grey", ls=":", label=f"best epoch {epochs[best]}")
    ax.set_yscale("log")
    # Whole epochs on x; plain numbers on the log y axis (not "1.55 x 10^0" on every minor tick).
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Minor ticks are labelled when the curve spans a few decades at most: all of them within a factor
    # of 3, else only 2x and 5x (they would crowd).
    def minor(v: float, _pos: Any) -> str:
        lo, hi = ax.get_ylim()
        if lo <= 0 or hi / lo > 100:
            return ""
        mantissa = round(v / 10 ** np.floor(np.log10(v)), 6)
        return f"{v:.3g}" if hi / lo <= 3 or mantissa in (2.0, 5.0) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
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
    axis_labels: tuple[str, str] = ("z_0", "z_1"),
    label_name: str | None = None,
) -> str:
    """A 2-D scatter of codes, coloured by label (``label_name``: the legend's title) when there is one."""
    if len(z) > max_points:
        idx = np.random.default_rng(seed).choice(len(z), max_points, replace=False)
        z = z[idx]
        labels = labels[idx] if labels is not None else None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is not None:
        uniq = list(dict.fromkeys(labels.tolist()))
        if len(uniq) <= 20:
            cmap = plt.get_cmap("tab10" if len(uniq) <= 10 else "tab20")
            for i, u in enumerate(sorted(uniq, key=str)):
                m = labels == u
                ax.scatter(z[m, 0], z[m, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=str(u))
            ax.legend(markerscale=2, fontsize=7, loc="best", ncol=2 if len(uniq) > 10 else 1, title=label_name,
                      title_fontsize=7)
        else:
            sc = ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.7, c=labels.astype(float), cmap="viridis")
            fig.colorbar(sc, ax=ax, label=label_name)
    else:
        ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.6)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
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


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def verdict_lines(
    metrics: dict[str, Any], baselines: dict[str, dict[str, Any]], headlines: tuple[tuple[str, bool], ...],
    compared: dict[str, tuple[float, str]] | None = None,
) -> list[str]:
    """One line per headline metric the run reported: its direction, ours, the best baseline and who wins.

    ``compared`` gives, per metric, ours on the data the baselines were measured on and a phrase naming that
    data, when it is not the data of ``metrics``: that value is compared (like with like), the phrase said."""
    lines = []
    for metric, higher in headlines:
        ours, where = metrics.get(metric), ""
        if compared and metric in compared and _number(compared[metric][0]):
            ours, where = compared[metric][0], f" {compared[metric][1]}"
        if not _number(ours):
            continue
        direction = "higher is better" if higher else "lower is better"
        scored = [(name, v[metric]) for name, v in baselines.items() if _number(v.get(metric))]
        if scored:
            name, best = (max if higher else min)(scored, key=lambda nv: nv[1])
            against = f"vs best baseline {name} {_fmt(best)}"
        elif "_vs_" in metric:  # a relative metric (compress's BD-rates): 0 is break-even with the named baseline
            best, against = 0.0, f"vs {metric.split('_vs_', 1)[1].removesuffix('_pct')} at 0 (break-even)"
        else:
            continue
        if ours == best:
            result = "a tie"
        else:
            result = "aeflow wins" if (ours > best) == higher else "aeflow loses"
        lines.append(f"- {metric} ({direction}): aeflow {_fmt(ours)}{where} {against}: {result}")
    return lines


def _headlines(app: str, metrics: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
    from tasks.apps import get_app
    from tasks.errors import ConfigError

    try:
        return get_app(app).headlines_of(metrics)
    except ConfigError:  # an unregistered app (tests): no verdicts
        return ()


def markdown_summary(
    app: str,
    run_uri: str,
    metrics: dict[str, Any],
    baselines: dict[str, dict[str, Any]],
    outputs: dict[str, str],
    notes: list[str],
    timings: dict[str, float],
    headlines: tuple[tuple[str, bool], ...] | None = None,
    compared: dict[str, tuple[float, str]] | None = None,
) -> str:
    rows = metrics_rows(metrics, baselines)
    lines = [f"# aeflow {app}", "", f"Run: `{run_uri}`", ""]
    if rows:
        header = list(rows[0])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
        lines.append("")
    heads = _headlines(app, metrics) if headlines is None else headlines
    verdicts = verdict_lines(metrics, baselines, heads, compared)
    if verdicts:
        lines += ["## Against the baselines", ""] + verdicts + [""]
    elif baselines and any(metric in metrics for metric, _ in heads):
        # e.g. compress at a rate outside every baseline's quality sweep: no comparison exists, and the
        # section saying so beats a summary silently without it
        lines += ["## Against the baselines", "",
                  "No headline metric could be compared with a baseline in this run: see the notes for why.", ""]
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


RUN_LINK_KEY = "{app}-run"  # the link artifact naming a flow run's run folder (read back by backfill --wait)


def publish_run_link(app: str, run_uri: str) -> None:
    """A Prefect link artifact: the run folder (outputs, report, manifest) of this flow run, also when the run
    was skipped as already complete (it links the complete run). Skipped outside a flow run."""
    try:
        from prefect.artifacts import create_link_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        create_link_artifact(link=run_uri, link_text=run_uri, key=RUN_LINK_KEY.format(app=app),
                             description=f"{app} run folder: outputs, report/, manifest.json")
    except Exception as e:  # noqa: BLE001 - artifacts are for people; a failure to post one must not fail the run
        log.warning("could not publish the run's link artifact: %s", e)


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
