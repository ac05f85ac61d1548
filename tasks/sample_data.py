"""Sample data from bundled sources (scikit-learn), written as CSV/Parquet.

Nothing is downloaded: every dataset here ships inside scikit-learn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd
from sklearn import datasets


@dataclass(frozen=True)
class SampleTable:
    name: str
    filename: str
    label: str
    id: str
    description: str


SAMPLE_TABLES = (
    SampleTable("digits", "digits.csv", "target", "id", "8x8 handwritten digits, 1797 x 64 pixel intensities, 10 classes"),
    SampleTable("breast_cancer", "breast_cancer.parquet", "target", "id", "569 tumours x 30 measurements, malignant/benign"),
    SampleTable("wine", "wine.csv", "target", "id", "178 wines x 13 chemical measurements, 3 cultivars"),
    SampleTable("diabetes", "diabetes.parquet", "target", "id", "442 patients x 10 baseline variables, disease progression"),
)

_LOADERS = {
    "digits": datasets.load_digits,
    "breast_cancer": datasets.load_breast_cancer,
    "wine": datasets.load_wine,
    "diabetes": datasets.load_diabetes,
}


def sample_frame(name: str) -> pd.DataFrame:
    """A bundled dataset as a DataFrame: ``id``, the features, then ``target``."""
    bunch = _LOADERS[name](as_frame=True)
    df = bunch.frame.copy()
    df.columns = [str(c).replace(" ", "_") for c in df.columns]
    df.insert(0, "id", range(len(df)))
    return df


def write_sample_tables(out_dir: str, overwrite: bool = False) -> dict[str, str]:
    """Write every sample table into ``out_dir``; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for t in SAMPLE_TABLES:
        path = os.path.join(out_dir, t.filename)
        if overwrite or not os.path.exists(path):
            df = sample_frame(t.name)
            tmp = path + ".tmp"
            if t.filename.endswith(".csv"):
                df.to_csv(tmp, index=False)
            else:
                df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        written[t.name] = path
    return written
