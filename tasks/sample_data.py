"""Sample data from bundled sources (scikit-learn), written as CSV/Parquet.

Nothing is downloaded: every dataset here ships inside scikit-learn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
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


# ---------------------------------------------------------------------------------------
# Image sets: digits as PNG class folders, and scikit-image's bundled photographs.

# Held out from every training set: the denoise benchmark scores these.
HELDOUT_PHOTOS = ("camera", "astronaut", "coffee")
TRAIN_PHOTOS = (
    "chelsea", "coins", "rocket", "moon", "text", "brick", "grass", "gravel", "page",
    "hubble_deep_field", "immunohistochemistry", "clock", "cell", "retina",
)
# The committed benchmark codec (benchmarks/weights/codec) has its own split: it was trained
# on crops of the other photographs (astronaut among them) and never saw these four.
CODEC_HELDOUT_PHOTOS = ("chelsea", "coffee", "rocket", "camera")


def write_digit_images(out_dir: str, overwrite: bool = False) -> str:
    """scikit-learn's 1,797 8x8 digits as grayscale PNGs in class folders: ``{out_dir}/<digit>/<id>.png``."""
    from PIL import Image

    bunch = datasets.load_digits()
    marker = os.path.join(out_dir, ".complete")
    if os.path.exists(marker) and not overwrite:
        return out_dir
    for i, (img, label) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        folder = os.path.join(out_dir, str(label))
        os.makedirs(folder, exist_ok=True)
        # 0..16 intensities to 0..255, white digit on black as in the original scans' inverse.
        Image.fromarray((img * (255.0 / 16.0)).round().astype("uint8"), "L").save(os.path.join(folder, f"{i:04d}.png"))
    open(marker, "w").close()
    return out_dir


def write_photos(out_dir: str, overwrite: bool = False) -> dict[str, str]:
    """scikit-image's bundled photographs as PNGs: ``train/``, ``heldout/`` (never trained on) and
    ``codec-heldout/`` (the photographs the committed benchmark codec never saw)."""
    from PIL import Image
    from skimage import data

    written = {}
    for split, names in (("train", TRAIN_PHOTOS), ("heldout", HELDOUT_PHOTOS), ("codec-heldout", CODEC_HELDOUT_PHOTOS)):
        folder = os.path.join(out_dir, split)
        os.makedirs(folder, exist_ok=True)
        for name in names:
            path = os.path.join(folder, f"{name}.png")
            if overwrite or not os.path.exists(path):
                arr = getattr(data, name)()
                if arr.dtype != "uint8":
                    arr = (arr > 0).astype("uint8") * 255
                tmp = path + ".tmp.png"
                Image.fromarray(arr).save(tmp)
                os.replace(tmp, path)
        written[split] = folder
    return written


NOISE_SIGMA = 25.0  # the denoise benchmark's noise level, in 0..255 units


def write_noisy(clean_dir: str, out_dir: str, sigma: float = NOISE_SIGMA, seed: int = 0, overwrite: bool = False) -> str:
    """Copies of the PNGs in ``clean_dir`` with seeded Gaussian noise (sigma in 0..255), rounded and clipped."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    for i, name in enumerate(sorted(n for n in os.listdir(clean_dir) if n.endswith(".png"))):
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and not overwrite:
            continue
        clean = np.asarray(Image.open(os.path.join(clean_dir, name)), dtype=np.float64)
        noisy = clean + np.random.default_rng([seed, i]).normal(0.0, sigma, clean.shape)
        tmp = path + ".tmp.png"
        Image.fromarray(np.clip(np.round(noisy), 0, 255).astype("uint8")).save(tmp)
        os.replace(tmp, path)
    return out_dir


def write_sample_images(out_dir: str, overwrite: bool = False) -> dict[str, str]:
    """Every sample image set under ``out_dir``; returns {name: folder}."""
    photos = write_photos(os.path.join(out_dir, "photos"), overwrite)
    noisy = write_noisy(photos["heldout"], os.path.join(out_dir, "photos", f"heldout-noisy-{NOISE_SIGMA:g}"), overwrite=overwrite)
    return {
        "photos_heldout_noisy": noisy,
        "digit_images": write_digit_images(os.path.join(out_dir, "digit-images"), overwrite),
        "photos_train": photos["train"],
        "photos_heldout": photos["heldout"],
        "photos_codec_heldout": photos["codec-heldout"],
    }
