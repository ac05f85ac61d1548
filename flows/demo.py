"""The demo: every application on the bundled sample data, and its headline table.

``aeflow demo`` (``make demo``) writes the sample data, runs :func:`demo_jobs` one after
another through the applications' flows and prints, per run, the app's headline
metrics (:attr:`~tasks.apps.base.Application.headlines`) next to the best baseline of
the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).resolve().parents[1] / "benchmarks" / "weights"


@dataclass(frozen=True)
class DemoJob:
    app: str
    data: str  # what it runs on, for people
    options: dict[str, Any] = field(default_factory=dict)  # config paths -> values


def demo_jobs(output: str, quick: bool = False) -> list[DemoJob]:
    """Write the sample data under ``output/sample-data`` and list the demo's runs."""
    from tasks.sample_data import (
        SAMPLE_TABLES,
        write_sample_images,
        write_sample_tables,
    )

    data_dir = os.path.join(output, "sample-data")
    paths = write_sample_tables(data_dir)
    tables = {t.name: t for t in SAMPLE_TABLES}

    def table_job(app: str, name: str, **opts: Any) -> DemoJob:
        t = tables[name]
        options = {"load.input": paths[name], "load.label_column": t.label, "load.id_column": t.id, "output": output,
                   **opts, **({"train.epochs": 15} if quick else {})}
        return DemoJob(app, name, options)

    jobs = [
        table_job("reduce", "digits", **{"model.latent_dim": 2}),
        table_job("reduce", "breast_cancer", **{"model.latent_dim": 2}),
        table_job("extract", "digits"),
        # breast cancer's label 0 is malignant: the anomalies of this demo.
        table_job("detect", "breast_cancer", **{"app.positive_label": "0"}),
        table_job("impute", "wine"),
    ]
    images = write_sample_images(data_dir)
    if (WEIGHTS / "denoise").is_dir():
        # The denoiser the benchmark trained on the training photos (19 CPU minutes, committed),
        # applied to the held-out photos with sigma=25 noise and scored against the clean ones.
        jobs.append(DemoJob("denoise", "photos (held out)", {
            "output": output, "model_run": str(WEIGHTS / "denoise"), "load.apply_to": images["photos_heldout_noisy"],
            "load.reference": images["photos_heldout"], "app.noise_sigma": 25.0}))
    else:  # small budgets: conv training on a CPU is slow (see benchmarks/RESULTS.md for longer runs)
        jobs.append(DemoJob("denoise", "photos", {
            "output": output, "load.input": images["photos_train"], "app.eval_images": 3,
            "app.patches": 400 if quick else 1500, "train.epochs": 2 if quick else 6}))
    jobs.append(DemoJob("index", "digit images", {"output": output, "load.input": images["digit_images"],
                                                  "load.size": 16, "train.epochs": 3 if quick else 15}))
    codec = next((WEIGHTS / name for name in ("hyperprior", "codec") if (WEIGHTS / name).is_dir()), None)
    if codec is not None:
        # The best committed codec (benchmarks/train_codec.py: the hyperprior), applied to the photos it never saw.
        jobs.append(DemoJob("compress", "photos (held out)", {
            "output": output, "model_run": str(codec), "load.apply_to": images["photos_codec_heldout"]}))
    return jobs


def headline_rows(app_name: str, metrics: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(metric, ours, best baseline "name value") for the app's headline metrics that the run reported."""
    from tasks.apps import get_app

    rows = []
    for metric, higher in get_app(app_name).headlines_of(metrics):
        ours = metrics.get(metric)
        if not isinstance(ours, (int, float)) or isinstance(ours, bool):
            continue
        scored = [(name, v[metric]) for name, v in baselines.items() if isinstance(v.get(metric), (int, float))]
        best = ""
        if scored:
            name, value = (max if higher else min)(scored, key=lambda nv: nv[1])
            best = f"{name} {value:.3f}"
        rows.append((metric + (" (↑)" if higher else " (↓)"), f"{ours:.3f}", best))
    return rows
