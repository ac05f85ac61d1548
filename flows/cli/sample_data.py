"""``aeflow sample-data``: the bundled datasets, written as files the applications read."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import out


def sample_data(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to write the sample data into.")] = "./artifacts/sample-data",
    overwrite: Annotated[bool, typer.Option(help="Rewrite files that exist.")] = False,
) -> None:
    """Write the bundled sample tables and images (nothing is downloaded).

    Tables: scikit-learn's digits, breast cancer, wine and diabetes. Images: the digits as PNG class folders (digit-images/<digit>/), and scikit-image's photographs: photos/train, photos/heldout, photos/heldout-noisy-25 and photos/codec-heldout.
    """
    from tasks.sample_data import (
        SAMPLE_TABLES,
        write_sample_images,
        write_sample_tables,
    )

    paths = write_sample_tables(output, overwrite=overwrite)
    for t in SAMPLE_TABLES:
        out.print(f"{paths[t.name]}  ({t.description}; label '{t.label}', id '{t.id}')", highlight=False)
    images = write_sample_images(output, overwrite=overwrite)
    out.print(f"{images['digit_images']}/<digit>/<id>.png  (1797 8x8 digits as PNG, one folder per class)", highlight=False)
    out.print(f"{images['photos_train']}  (scikit-image photographs for training)", highlight=False)
    out.print(f"{images['photos_heldout']}  (camera, astronaut, coffee: held out, never trained on)", highlight=False)
    out.print(f"{images['photos_heldout_noisy']}  (the held-out photographs with Gaussian noise, sigma 25/255)",
              highlight=False)
    out.print(f"{images['photos_codec_heldout']}  (chelsea, coffee, rocket, camera: never seen by the committed "
              "benchmark codec)", highlight=False)
