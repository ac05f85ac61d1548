"""Quality of the tabular applications against the tools users would otherwise pick.

Runs the applications' own code paths (the plain functions in ``tasks/apps/``,
with each application's default RunConfig: no per-dataset settings) on
scikit-learn's bundled datasets, with fixed seeds, and prints Markdown tables of
mean ± std over seeds, with each goal marked met or missed (and by how much).

    python -m benchmarks.quality_tabular [--data report|tune] [--quick] [--only detect,impute,extract,reduce]

Tuning data and reporting data are kept apart (``--data``):

- ``tune``: the splits the defaults were chosen on (by this benchmark's earlier sessions and the
  sweeps recorded in RESULTS.md): seeds / subsamples / fold assignments numbered from 0.
- ``report`` (the default): data no default was chosen on: fresh seeds (numbered from
  ``REPORT_SEED`` = 1000: other anomaly subsamples and clean splits, other MCAR masks, other fold
  assignments and model seeds), the unshuffled 4-fold assignment for extract (tuning looked at the
  5-fold one), and a dataset never tuned on (iris, for detect and impute).

``--quick`` is a smoke run (fewer cases, seeds and splits; not for RESULTS.md); ``--only`` picks
applications, ``--datasets`` impute's datasets. The full report run took ~40 min for detect,
~25 min for extract and over an hour for impute (3 seeds, IterativeImputer(ExtraTrees) on digits
dominates) on the shared 2-core machine under heavy load; a quiet machine needs about a third.

- detect: breast cancer (malignant subsampled to ~6% anomalies), wine (one class
  as anomalies, ~10%), digits (one class vs the rest, ~5%: at 10% the anomaly
  class is as frequent as each of the nine normal ones and, in the contaminated
  regime, no method ranks it above chance), iris (report only: one class vs the
  rest, ~10%); regimes "clean"
  (trained on 70% of the normal rows, scored on the other 30% plus the anomalies)
  and "contaminated" (trained and scored on everything). ROC-AUC of ours (and of ours without the
  autoencoder's code-space part: what the autoencoder contributes) vs IsolationForest, PCA
  reconstruction error and pyod's ECOD, COPOD, HBOS and AutoEncoder (defaults), with each method's
  fit + scoring time.
- impute: 20% MCAR on breast cancer, wine, diabetes, digits (and iris, report only); RMSE on
  min-max scaled values of the hidden cells vs mean, KNNImputer(5), IterativeImputer
  (BayesianRidge) and IterativeImputer(ExtraTrees, MissForest-style).
- extract: digits, stratified k-fold LogisticRegression accuracy on raw, PCA-16,
  AE-16, and with 10 / 50 labels per class; shuffled and unshuffled fold assignments.
- reduce: digits, held-out (20%) reconstruction MSE and trustworthiness vs PCA
  at d = 2, 4, 8, 16.
"""

from __future__ import annotations

import os

# One thread per library: on a small shared machine, BLAS/torch thread pools spin against
# each other (IterativeImputer took 195 s instead of 7 s on digits with two threads here).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import dataclasses
import platform
import time
import warnings
from collections import defaultdict

import numpy as np
import torch
from sklearn import datasets
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness

from models.training import predict
from tasks.apps import detect, extract, impute, reduce
from tasks.config import ModelConfig

REPORT_SEED = 1000  # seeds of the reporting data start here; the tuning data's start at 0

LOADERS = {
    "breast_cancer": datasets.load_breast_cancer,
    "wine": datasets.load_wine,
    "diabetes": datasets.load_diabetes,
    "digits": datasets.load_digits,
    "iris": datasets.load_iris,
}


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    b = LOADERS[name]()
    return b.data.astype("float64"), b.target


def standardise(fit_x: np.ndarray, *xs: np.ndarray) -> list[np.ndarray]:
    """The pipeline's standard scaler (nan-aware, constant columns left unscaled)."""
    mu, sd = np.nanmean(fit_x, 0), np.nanstd(fit_x, 0, ddof=1)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [((x - mu) / sd).astype("float32") for x in (fit_x, *xs)]


def split_rows(n: int, val: float, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 99]).random(n) < val


def ms(v: list[float], digits: int = 3) -> str:
    return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}" if v else "—"


def verdict(ours: float, other: float, higher_better: bool) -> str:
    diff = ours - other if higher_better else other - ours
    return "met" if diff >= 0 else f"missed by {abs(diff):.3f}"


# ---------------------------------------------------------------------------------------
# detect


SETTINGS = {"detect_subsamples": 20, "impute_seeds": 3, "data": "report", "datasets": ()}
# Share of anomalies in the digits cases. At 0.10 (this benchmark until 2026-11-27) the anomaly digit was as
# frequent as each of the nine normal digits: trained on contaminated data, every method scored ~0.50 ROC-AUC.
DIGITS_ANOMALY_RATE = 0.05
DETECT_PEERS = {"isolation_forest": "IsolationForest", "pca": "PCA recon", "ecod": "ECOD", "copod": "COPOD",
                "hbos": "HBOS", "pyod_autoencoder": "pyod AutoEncoder"}


def detect_cases(quick: bool, data: str = "tune"):
    """(dataset, case number, x, normal rows, anomaly rows) subsamples, fixed seeds.

    ``data="tune"``: the cases the defaults were chosen on (seeds from 0: breast-cancer subsample s, the
    anomaly class c subsampled with seed c). ``"report"``: other subsamples of the same datasets (seeds
    from REPORT_SEED) and iris, which no default was chosen on. The case number also seeds the clean
    split and the model."""
    base = 0 if data == "tune" else REPORT_SEED
    x, y = load("breast_cancer")
    normal, malignant = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_anom = int(round(0.06 / 0.94 * len(normal)))
    for s in range(base, base + (5 if quick else SETTINGS["detect_subsamples"])):
        yield "breast_cancer", s, x, normal, np.random.default_rng(s).choice(malignant, n_anom, replace=False)
    more = (("wine", 0.10), ("digits", DIGITS_ANOMALY_RATE)) + ((("iris", 0.10),) if data == "report" else ())
    for name, rate in more:
        x, y = load(name)
        cls = np.unique(y)
        cls = cls[:3] if quick and name == "digits" else cls
        for c in cls:
            normal, anom = np.flatnonzero(y != c), np.flatnonzero(y == c)
            n_anom = min(len(anom), int(round(rate / (1 - rate) * len(normal))))
            case = base + int(c)
            seed = int(c) if data == "tune" else [case, int(c)]
            yield name, case, x, normal, np.random.default_rng(seed).choice(anom, n_anom, replace=False)


def without_code_part(model: detect.KnnAutoencoderDetector) -> detect.KnnAutoencoderDetector:
    """The same fitted detector with the autoencoder's code-space part at weight 0 (the reconstruction
    part already weighs 0 by default): the score without anything the autoencoder learned."""
    other = detect.KnnAutoencoderDetector(dataclasses.replace(model.config, knn_weight=0.0))
    other.load_state_dict(model.state_dict())
    return other.eval()


def bench_detect(quick: bool) -> list[str]:
    rc = detect.DetectRunConfig()
    cfg = rc.app
    res: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seconds: dict[str, float] = defaultdict(float)
    rows_scored = 0
    for name, case, x, normal, anom in detect_cases(quick, SETTINGS["data"]):
        rng = np.random.default_rng([case, 7])
        perm = rng.permutation(normal)
        clean_train = perm[: int(0.7 * len(perm))]
        clean_test = np.concatenate([perm[int(0.7 * len(perm)) :], anom])
        everything = np.concatenate([normal, anom])
        for regime, tr, te in (("clean", clean_train, clean_test), ("contaminated", everything, everything)):
            y = np.isin(te, anom)
            fx, tx = standardise(x[tr], x[te])
            val = split_rows(len(fx), 0.2, case)
            t0 = time.perf_counter()
            model, _ = detect.fit_detector(fx[~val], fx[val], rc.model, rc.train.model_copy(update={"seed": case}),
                                           **detect.detector_options(cfg))
            scores = {"aeflow": detect.anomaly_scores(model, tx)}
            seconds["aeflow"] += time.perf_counter() - t0
            scores["aeflow_no_ae"] = detect.anomaly_scores(without_code_part(model), tx)
            took: dict[str, float] = {}
            scores.update(detect.baseline_scores(fx, tx, k=rc.model.latent_dim, contamination=cfg.contamination,
                                                 seed=case, seconds=took))
            for method, t in took.items():
                seconds[method] += t
            rows_scored += len(tx)
            res[(name, regime)]["_tail_weight"].append(model.config.tail_weight)
            for method, s in scores.items():
                res[(name, regime)][method].append(detect.ranking_metrics(y, s)["roc_auc"])
        print(f"  detect {name} case {case} done", flush=True)
    peers = list(DETECT_PEERS)
    lines = [f"### detect ({SETTINGS['data']} data): ROC-AUC (mean ± std over subsamples / anomaly classes)", "",
             "| dataset | regime | n | aeflow | aeflow without the AE part | " + " | ".join(DETECT_PEERS.values())
             + " | best peer | goal: ≥ best peer | tail weight in use |",
             "|---|---|---|---|---|" + "---|" * len(peers) + "---|---|---|"]
    for (name, regime), d in res.items():
        m = {k: float(np.mean(v)) for k, v in d.items()}
        best = max((p for p in peers if p in m), key=lambda p: m[p])
        lines.append(
            f"| {name} | {regime} | {len(d['aeflow'])} | {ms(d['aeflow'])} | {ms(d['aeflow_no_ae'])} | "
            + " | ".join(ms(d[k]) for k in peers)
            + f" | {DETECT_PEERS[best]} | {verdict(m['aeflow'], m[best], True)} | {ms(d['_tail_weight'], 0)} |"
        )
    lines += ["", f"Fit + scoring time over all {rows_scored:,} scored rows (both regimes, every case; one thread): "
              + ", ".join(f"{DETECT_PEERS.get(k, 'aeflow')} {v:.1f} s" for k, v in seconds.items())
              + ". Scoring speed on a larger table: `python -m benchmarks.detect_speed`."]
    return lines


# ---------------------------------------------------------------------------------------
# impute


IMPUTE_PEERS = {"mean_mode": "mean", "knn": "KNNImputer(5)", "iterative": "Iterative(BayesianRidge)",
                "iterative_extratrees": "Iterative(ExtraTrees)"}


def bench_impute(quick: bool) -> list[str]:
    rc = impute.ImputeRunConfig()
    report = SETTINGS["data"] == "report"
    base = REPORT_SEED if report else 0
    res: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    names = ("breast_cancer", "wine", "diabetes", "digits") + (("iris",) if report else ())
    for name in (n for n in names if not SETTINGS["datasets"] or n in SETTINGS["datasets"]):
        x, _ = load(name)
        groups = impute.numeric_groups(x.shape[1])
        lo, hi = x.min(0), x.max(0)
        for seed in range(base, base + (2 if quick else SETTINGS["impute_seeds"])):
            # 20% MCAR: the hidden cells are truly missing for every method (transductive, as users run imputers).
            hidden = np.random.default_rng(seed).random(x.shape) < 0.2
            xm = np.where(hidden, np.nan, x)
            (xs,) = standardise(xm)
            mu, sd = np.nanmean(xm, 0), np.nanstd(xm, 0, ddof=1)
            sd = np.where(sd > 1e-12, sd, 1.0)
            val = split_rows(len(xs), 0.1, seed)
            t0 = time.perf_counter()
            model, _ = impute.fit_imputer(xs[~val], xs[val], rc.model, rc.train.model_copy(update={"seed": seed}),
                                          mask_fraction=rc.app.mask_fraction, members=rc.app.members,
                                          passes=rc.app.passes, head_alpha=rc.app.head_alpha)
            filled = {"aeflow": impute.fill(xs, impute.reconstruct(model, xs), groups)}
            seconds = {"aeflow": time.perf_counter() - t0}
            filled.update(impute.baseline_imputations(None, xs, groups, k=5, seed=seed, extra_trees=True, seconds=seconds))
            for method, f in filled.items():
                err = impute.imputation_errors(x, f * sd + mu, hidden, groups, lo, hi)
                res[name][method].append(err["rmse"])
                res[name]["_s_" + method].append(seconds[method])
            print(f"  impute {name} seed {seed} done", flush=True)
    peers = list(IMPUTE_PEERS)
    lines = [f"### impute ({SETTINGS['data']} data): RMSE on hidden cells, min-max scaled (mean ± std over seeds; "
             "lower is better)", "",
             "| dataset | seeds | aeflow | " + " | ".join(IMPUTE_PEERS.values())
             + " | goal: ≤ Iterative(ExtraTrees) | ≤ every peer | aeflow wins (seeds, vs ExtraTrees) | seconds aeflow / ExtraTrees |",
             "|---|---|---|" + "---|" * len(peers) + "---|---|---|---|"]
    for name, d in res.items():
        m = {k: float(np.mean(v)) for k, v in d.items()}
        best = min(peers, key=lambda p: m[p])
        wins = sum(a <= e for a, e in zip(d["aeflow"], d["iterative_extratrees"], strict=True))
        lines.append(
            f"| {name} | {len(d['aeflow'])} | {ms(d['aeflow'])} | " + " | ".join(ms(d[k]) for k in peers)
            + f" | {verdict(m['aeflow'], m['iterative_extratrees'], False)} | {verdict(m['aeflow'], m[best], False)}"
            f" ({IMPUTE_PEERS[best]}) | {wins} of {len(d['aeflow'])} | {m['_s_aeflow']:.1f} / {m['_s_iterative_extratrees']:.1f} |"
        )
    return lines


# ---------------------------------------------------------------------------------------
# extract and reduce


def extract_splits(quick: bool) -> list[tuple[str, int, bool, int]]:
    """(label, seed, shuffle, folds) of the fold assignments. tune: shuffled 5-fold with seeds 0-2 and the
    unshuffled 5-fold assignment (the defaults were chosen on them); report: shuffled 5-fold with seeds from
    REPORT_SEED and the unshuffled 4-fold assignment. Unshuffled folds are contiguous blocks of rows per class:
    digits is in collection order (by writer), so the test fold holds writers the training folds lack."""
    if SETTINGS["data"] == "tune":
        seeds = (0,) if quick else (0, 1, 2)
        return [(f"shuffled 5-fold, seed {s}", s, True, 5) for s in seeds] + [("unshuffled 5-fold", 0, False, 5)]
    seeds = (REPORT_SEED,) if quick else (REPORT_SEED, REPORT_SEED + 1, REPORT_SEED + 2)
    return [(f"shuffled 5-fold, seed {s}", s, True, 5) for s in seeds] + [("unshuffled 4-fold", REPORT_SEED, False, 4)]


def bench_extract(quick: bool) -> list[str]:
    rc = extract.ExtractRunConfig()
    x, y = load("digits")
    (xs,) = standardise(x)
    splits = extract_splits(quick)
    runs = [(label, extract.downstream_accuracy(xs, y, rc.model, rc.train.model_copy(update={"seed": seed}), folds=folds,
                                                few_labels=tuple(rc.app.few_labels), seed=seed, shuffle=shuffle,
                                                input_mask=rc.app.input_mask))
            for label, seed, shuffle, folds in splits]
    k = rc.model.latent_dim
    metrics = [("accuracy", "all")] + [(f"accuracy_{n}_per_class", f"{n} per class") for n in rc.app.few_labels]
    lines = [f"### extract ({SETTINGS['data']} data): digits, stratified k-fold LogisticRegression accuracy (k = {k}; "
             f"encoder/PCA fitted on training folds only; mean ± std over {len(runs)} fold assignments: "
             + "; ".join(label for label, *_ in splits) + ")", "",
             f"| labels | raw (64) | PCA-{k} | AE-{k} (aeflow) | AE − PCA (mean ± std) | goal: AE ≥ PCA | AE ≥ PCA per assignment |",
             "|---|---|---|---|---|---|---|"]
    for metric, label in metrics:
        v = {m: [r[m][metric] for _, r in runs] for m in ("raw", "pca", "ae")}
        diff = [a - p for a, p in zip(v["ae"], v["pca"], strict=True)]
        wins = sum(d >= 0 for d in diff)
        lines.append(f"| {label} | {ms(v['raw'])} | {ms(v['pca'])} | {ms(v['ae'])} | {np.mean(diff):+.3f} ± {np.std(diff):.3f} | "
                     f"{verdict(float(np.mean(v['ae'])), float(np.mean(v['pca'])), True)} | {wins} of {len(runs)} |")
    lines += ["", "Per fold assignment (AE − PCA, all / " + " / ".join(lab for _, lab in metrics[1:]) + " labels): "
              + "; ".join(f"{label}: " + " / ".join(f"{r['ae'][m] - r['pca'][m]:+.3f}" for m, _ in metrics)
                          for label, r in runs)]
    return lines


def bench_reduce(quick: bool) -> list[str]:
    rc = reduce.ReduceRunConfig()
    x, _ = load("digits")
    base = REPORT_SEED if SETTINGS["data"] == "report" else 0  # other held-out splits and initialisations
    n = 2 if quick else 3
    lines = [f"### reduce ({SETTINGS['data']} data): digits, held-out 20%, split and model seeds {base}–{base + n - 1} "
             "(mean ± std over seeds)", "",
             "| d | MSE aeflow | MSE PCA | trustworthiness aeflow | trustworthiness PCA |", "|---|---|---|---|---|"]
    for d in (2, 4, 8, 16):
        r = defaultdict(list)
        for seed in range(base, base + n):
            val = split_rows(len(x), 0.2, seed)
            tx, vx = standardise(x[~val], x[val])
            mcfg = ModelConfig(**{**rc.model.model_dump(), "latent_dim": d})
            # reduce's fit is the base TableApp.fit: a dense AE, plain reconstruction loss, early stopping.
            model = extract.train_encoder(tx, mcfg, rc.train.model_copy(update={"seed": seed}), seed=seed)
            recon = predict(lambda b: model(b).x_hat, vx, device=torch.device("cpu"))
            z = extract.encode(model, vx)
            pca = PCA(n_components=d, random_state=seed).fit(tx)
            zp = pca.transform(vx)
            r["mse_ae"].append(float(np.mean((recon - vx) ** 2)))
            r["mse_pca"].append(float(np.mean((pca.inverse_transform(zp) - vx) ** 2)))
            r["tw_ae"].append(float(trustworthiness(vx, z, n_neighbors=10)))
            r["tw_pca"].append(float(trustworthiness(vx, zp, n_neighbors=10)))
        lines.append(f"| {d} | {ms(r['mse_ae'])} | {ms(r['mse_pca'])} | {ms(r['tw_ae'])} | {ms(r['tw_pca'])} |")
    return lines


BENCHES = {"detect": bench_detect, "impute": bench_impute, "extract": bench_extract, "reduce": bench_reduce}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Fewer seeds/cases (a smoke run, not for RESULTS.md).")
    p.add_argument("--only", default=",".join(BENCHES), help="Comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--data", choices=("report", "tune"), default="report",
                   help="report: data no default was chosen on (fresh seeds, unshuffled folds, iris); tune: the data "
                   "the defaults were chosen on.")
    p.add_argument("--detect-subsamples", type=int, default=20, help="Breast-cancer subsamples for detect (20).")
    p.add_argument("--impute-seeds", type=int, default=3, help="MCAR seeds for impute (3).")
    p.add_argument("--datasets", default="", help="Comma-separated subset of impute's datasets (default: all).")
    args = p.parse_args()
    SETTINGS.update(detect_subsamples=args.detect_subsamples, impute_seeds=args.impute_seeds, data=args.data,
                    datasets=tuple(d for d in args.datasets.split(",") if d))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    out = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
           f"{torch.__version__} on CPU, {torch.get_num_threads()} threads.", ""]
    for name in args.only.split(","):
        ts = time.perf_counter()
        print(f"running {name} …", flush=True)
        out += BENCHES[name](args.quick) + ["", f"({name}: {time.perf_counter() - ts:.0f} s)", ""]
    out.append(f"Total {time.perf_counter() - t0:.0f} s.")
    print("\n".join(out))


if __name__ == "__main__":
    main()
