"""What a data scientist reads in a run's report: the summary says, per headline metric, which way
is better, the best baseline and whether aeflow wins; the plots have readable, labelled axes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tasks import report


class _Run:
    """A RunDir stand-in that keeps what is written."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.files[rel] = data


@pytest.fixture
def figures(monkeypatch) -> list[Any]:
    """The figures the report functions save, drawn (so tick labels exist) before they are closed."""
    kept: list[Any] = []
    original = report.save_figure

    def keep(run, rel, fig):
        fig.canvas.draw()
        kept.append(fig)
        snapshot = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(),
                     [t.get_text() for t in ax.get_xticklabels()],
                     [t.get_text() for t in ax.get_yticklabels()] + [t.get_text() for t in ax.get_yticklabels(minor=True)],
                     ax.get_legend().get_title().get_text() if ax.get_legend() else None)
                    for ax in fig.axes]
        kept[-1] = snapshot
        return original(run, rel, fig)

    monkeypatch.setattr(report, "save_figure", keep)
    return kept


def test_summary_says_direction_best_baseline_and_who_wins():
    # reduce's numbers from a walkthrough run: aeflow loses both headlines to PCA
    md = report.markdown_summary(
        "reduce", "/runs/reduce/x", {"recon_mse": 1.147, "trustworthiness": 0.7793, "n_eval_rows": 363},
        {"pca": {"recon_mse": 1.085, "trustworthiness": 0.8336}}, {}, [], {})
    assert "## Against the baselines" in md
    assert "- recon_mse (lower is better): aeflow 1.147 vs best baseline pca 1.085: aeflow loses" in md
    assert "- trustworthiness (higher is better): aeflow 0.7793 vs best baseline pca 0.8336: aeflow loses" in md


def test_summary_picks_the_best_baseline_in_the_right_direction():
    md = report.markdown_summary(
        "impute", "/r", {"rmse": 0.1548, "accuracy": None},
        {"mean_mode": {"rmse": 0.2394, "accuracy": None}, "knn": {"rmse": 0.1533, "accuracy": None}}, {}, [], {})
    assert "- rmse (lower is better): aeflow 0.1548 vs best baseline knn 0.1533: aeflow loses" in md
    assert "accuracy (" not in md, "a metric the run did not measure (no categorical cells) gets no verdict"
    md = report.markdown_summary(
        "detect", "/r", {"roc_auc": 0.95, "average_precision": float("nan")},
        {"isolation_forest": {"roc_auc": 0.80}, "hbos": {"roc_auc": 0.91}}, {}, [], {})
    assert "- roc_auc (higher is better): aeflow 0.95 vs best baseline hbos 0.91: aeflow wins" in md
    assert "average_precision (" not in md and "nan" not in md.split("## Against the baselines")[1]


def test_a_summary_with_no_comparable_baseline_says_so():
    """compress at 4.25 bpp, past every JPEG/WebP quality swept: every baseline value and BD-rate is None; the
    section said nothing and vanished (found by the ninth walkthrough)."""
    md = report.markdown_summary("compress", "/r", {"psnr": 38.0, "bpp": 4.252, "bd_rate_vs_jpeg_pct": None},
                                 {"jpeg": {"psnr": None, "bpp": None}, "webp": {"psnr": None, "bpp": None}}, {},
                                 ["jpeg at aeflow's 4.25 bpp: outside the rates its quality sweep reached"], {})
    section = md.split("## Against the baselines", 1)[1]
    assert "No headline metric could be compared with a baseline in this run: see the notes" in section
    assert "| 4.252 | 4.252" not in md
    assert "## Against the baselines" not in report.markdown_summary("compress", "/r", {"psnr": 38.0}, {}, {}, [], {})


def test_bd_rate_is_judged_against_break_even():
    md = report.markdown_summary("compress", "/r", {"psnr": 30.0, "bd_rate_vs_jpeg_pct": 12.5, "bd_rate_vs_webp_pct": -3.0},
                                 {"jpeg": {"psnr": 31.0}, "webp": {"psnr": 29.0}}, {}, [], {})
    assert "- bd_rate_vs_jpeg_pct (lower is better): aeflow 12.5 vs jpeg at 0 (break-even): aeflow loses" in md
    assert "- bd_rate_vs_webp_pct (lower is better): aeflow -3 vs webp at 0 (break-even): aeflow wins" in md
    assert "- psnr (higher is better): aeflow 30 vs best baseline jpeg 31: aeflow loses" in md


def test_the_verdict_compares_ours_on_the_baselines_images_and_says_so():
    """compress with --rd-images below the image count: JPEG/WebP are measured on the swept sample only; the verdict
    compared aeflow's mean over every image with them ("aeflow 42.19 vs webp 49.96")."""
    compared = {"psnr": (50.5, "on the 2 swept images, the baselines' (42.19 over all 40)")}
    md = report.markdown_summary("compress", "/r", {"psnr": 42.19}, {"webp": {"psnr": 49.96}}, {}, [], {},
                                 compared=compared)
    assert ("- psnr (higher is better): aeflow 50.5 on the 2 swept images, the baselines' (42.19 over all 40) "
            "vs best baseline webp 49.96: aeflow wins") in md
    assert "- psnr (higher is better): aeflow 42.19 vs best baseline webp 49.96" in report.markdown_summary(
        "compress", "/r", {"psnr": 42.19}, {"webp": {"psnr": 49.96}}, {}, [], {})


def test_training_curve_has_whole_epochs_and_plain_loss_ticks(figures):
    history = [{"epoch": e, "train_loss": 1.40 + 0.01 * e, "val_loss": 1.56 - 0.01 * e} for e in (1, 2, 3)]
    assert report.training_curve(_Run(), history) == "report/training.png"
    (title, xlabel, ylabel, xticks, yticks, _), = figures[0]
    assert (title, xlabel, ylabel) == ("Training", "epoch", "loss")
    shown_x = [t for t in xticks if t]
    assert shown_x and all(t.lstrip("−-").isdigit() for t in shown_x), f"fractional epochs on the x axis: {xticks}"
    shown_y = [t for t in yticks if t]
    assert shown_y, "the loss axis has labelled ticks"
    assert not any("times" in t or "×" in t or "^" in t for t in shown_y), f"scientific tick labels: {shown_y}"


def test_a_one_epoch_training_curve_shows_its_points(monkeypatch):
    """A 1-epoch run's training.png was empty: a line through one point draws nothing (found by the ninth
    walkthrough); with fewer than 3 epochs the points are marked."""
    drawn = {}

    def keep(run, rel, fig):
        drawn.update({line.get_label(): line.get_marker() for line in fig.axes[0].get_lines()})
        return rel

    monkeypatch.setattr(report, "save_figure", keep)
    report.training_curve(_Run(), [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.6}])
    assert drawn["train"] not in (None, "", "None") and drawn["validation"] not in (None, "", "None"), drawn
    report.training_curve(_Run(), [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e} for e in range(1, 6)])
    assert drawn["train"] in ("", "None"), "longer curves stay plain lines"


def test_embedding_scatter_labels_axes_and_legend(figures):
    z = np.random.default_rng(0).normal(size=(60, 2))
    labels = np.repeat(np.arange(3), 20)
    report.scatter_2d(_Run(), z, labels, "report/embedding.png", "Embedding (z_0, z_1)", label_name="target")
    (title, xlabel, ylabel, _, _, legend_title), = figures[0]
    assert (title, xlabel, ylabel, legend_title) == ("Embedding (z_0, z_1)", "z_0", "z_1", "target")


def test_contact_sheet_says_what_the_numbers_are(monkeypatch):
    from matplotlib.figure import Figure

    from tasks.apps.index import contact_sheet

    titles: list[str] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (titles.append(fig.get_suptitle()), save(fig, *a, **kw))[1])
    img = np.zeros((1, 8, 8), np.uint8)
    png = contact_sheet([img], [[img, img]], np.array([[0.0, 12.5]]), ["0/a.png"], [["0/a.png", "0/b.png"]])
    assert png.startswith(b"\x89PNG")
    assert titles and "squared L2 distance between codes" in titles[0], titles


def test_index_notes_a_pca_baseline_that_is_the_raw_pixels():
    from tasks.apps.base import Evaluation
    from tasks.apps.index import Config, precision_metrics

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(40, 1, 4, 4), dtype=np.uint8)  # 16 pixels
    labels = np.repeat(np.arange(4), 10)
    codes = rng.normal(size=(40, 32)).astype(np.float32)  # a code larger than the image
    ev = Evaluation()
    precision_metrics(codes, images, labels, np.arange(40), 5, Config(), ev, 0)
    assert "pca_16" in ev.baselines
    assert ev.baselines["pca_16"]["precision_at_5"] == pytest.approx(ev.baselines["raw_pixels"]["precision_at_5"])
    assert any(n.startswith("pca_16 keeps every dimension the 40 images' 16 pixels span") and "ranks as raw_pixels does" in n
               for n in ev.notes), ev.notes


def test_compress_baseline_is_not_extrapolated_past_its_sweep():
    import pandas as pd

    from tasks.apps.compress import equal_rate_baseline

    # webp's mean sweep on the walkthrough run topped out at 1.73 bpp; aeflow coded at 1.869 bpp
    webp = pd.DataFrame({"bpp": [0.16, 1.21, 1.73], "psnr": [31.7, 43.2, 46.24], "ms_ssim": [0.96, 0.997, 0.9988]})
    row, note = equal_rate_baseline("webp", 1.869, webp)
    assert row == {"bpp": None, "psnr": None, "ms_ssim": None}, \
        "np.interp's clamp must not pass for webp at 1.869 bpp, nor aeflow's rate show as a rate webp reached"
    assert note == "webp at aeflow's 1.87 bpp: outside the rates its quality sweep reached (0.16-1.73 bpp), not extrapolated (None)."
    row, note = equal_rate_baseline("webp", 1.47, webp)
    assert note is None and row["psnr"] == pytest.approx((43.2 + 46.24) / 2) and row["bpp"] == 1.47
