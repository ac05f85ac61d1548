"""``aeflow compress`` and ``aeflow decompress``: images <-> real ``.aec`` bitstreams."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from flows.cli.common import err, fail, out


def compress(
    images: Annotated[list[str], typer.Argument(help="Images to compress (PNG/JPEG; local or s3://; a quoted glob such as 's3://b/photos/*.png' is expanded).", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="A compress run, or a model folder, whose codec to use.", show_default=False)],
    output_dir: Annotated[str, typer.Option("--output", "-o", help="Folder for the .aec files (local or s3://).")] = ".",
    quality: Annotated[int | None, typer.Option("--quality", "-q", help="Quality level, 0 (lowest rate) to the codec's last (default: its middle level).", show_default=False)] = None,
    refine_steps: Annotated[int, typer.Option("--refine-steps", min=0, help="Optimise each image's latent for this many steps before coding (about 100: fewer bits and higher PSNR, a few hundred times slower encoding; decoding unchanged). Factorized codecs only.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file on stdout.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace .aec files that already exist in --output (default: refuse them by name and write nothing).")] = False,
) -> None:
    """Compress images into .aec files with a trained codec: OUTDIR/<name>.aec.

    Grayscale images are coded as L, colour as RGB (a palette, CMYK or 16-bit
    image is converted, and the line says so); an image with transparent pixels
    (an alpha channel below 255 or a transparent colour) is refused: the codec
    has no alpha plane. A fully opaque alpha channel is dropped (nothing is lost)
    and the image coded as RGB or L."""
    from tasks.codec_files import compress_files, expand_globs

    @contextmanager
    def progress(uri: str) -> Iterator[Callable[[int, int], None] | None]:
        if as_json:
            yield None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn(f"refining {uri}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task_id = bar.add_task("refine", total=refine_steps)
            yield lambda done, _total: bar.update(task_id, completed=done)

    try:
        images = expand_globs(images, "image")  # 's3://b/photos/*.png' (a shell expands only local ones)
        with _working("coding", images, quiet=as_json or refine_steps > 0) as done:
            for r in compress_files(images, model, output_dir, quality, refine_steps, progress, overwrite):
                if as_json:
                    print(json.dumps(r.__dict__))
                else:
                    converted = f"; {r.converted}" if r.converted else ""
                    out.print(f"{r.input} -> {r.output}  ({r.bytes:,} bytes, {r.bpp:.3f} bpp, quality {r.quality}"
                              f"{converted})", highlight=False)
                done()
    except Exception as e:  # user errors and outages: one line; anything else: a bug, with its traceback
        fail(e, "compress")


@contextmanager
def _working(verb: str, names: list[str], quiet: bool = False) -> Iterator[Callable[[], None]]:
    """A spinner on a terminal's stderr while files are coded: a 6 MP photograph takes 15-40 s on a CPU, and
    nothing was shown until its line. ``done()`` after each file. Nothing on a pipe (rich draws no live
    display there) nor with ``quiet`` (--json, or the refining encoder's own progress bar)."""
    if quiet or not err.is_terminal:
        yield lambda: None
        return
    count = [0]

    def text() -> str:
        return f"{verb} {count[0] + 1} of {len(names)}" if len(names) > 1 else f"{verb} {names[0]}"

    with err.status(text()) as status:
        def done() -> None:
            count[0] += 1
            if count[0] < len(names):
                status.update(text())

        yield done


def decompress(
    files: Annotated[list[str], typer.Argument(help=".aec files to decode (local or s3://; a quoted glob such as 's3://b/codes/*.aec' is expanded).", show_default=False)],
    output_dir: Annotated[str, typer.Option("--output", "-o", help="Folder for the decoded PNGs (local or s3://).")] = ".",
    model: Annotated[str | None, typer.Option("--model", "-m", help="The compress run (or model folder) that made the files (default: found by the files' model identity under --root).", show_default=False)] = None,
    root: Annotated[str, typer.Option("--root", envvar="AEFLOW_OUTPUT", help="Artifact root searched for the model when --model is not given (default $AEFLOW_OUTPUT, where `aeflow run` writes, else ./artifacts).")] = "./artifacts",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace PNGs that already exist in --output (default: refuse them by name and write nothing).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file on stdout (input, output, width, height, mode).")] = False,
) -> None:
    """Decode .aec files to PNG: OUTDIR/<name>.png. The model is checked against each file's identity."""
    from tasks.codec_files import decompress_files, expand_globs

    try:
        files = expand_globs(files, ".aec file")  # 's3://b/codes/*.aec' (a shell expands only local ones)
        with _working("decoding", files, quiet=as_json) as done:
            for r in decompress_files(files, output_dir, model, root, overwrite):
                if as_json:
                    print(json.dumps(r.__dict__))
                else:
                    out.print(f"{r.input} -> {r.output}  ({r.width}x{r.height} {r.mode})", highlight=False)
                done()
    except Exception as e:  # user errors and outages: one line; anything else: a bug, with its traceback
        fail(e, "decompress")
