"""Leftovers of the eleventh walkthrough, fixed in the twelfth session.

- `aeflow compress` refused a PNG whose alpha channel is fully opaque (every pixel 255, as many editors
  export RGB photographs), though dropping that channel loses nothing; one with transparent pixels is still
  refused (the codec has no alpha plane).
- `aeflow run compress --set model.latent_dim=4` (a dense autoencoder's setting: the codec has its own) was
  accepted, changed nothing but the run's fingerprint, and `--show-config` listed the section as if it
  mattered; likewise `preprocess.scaler`/`max_categories` for denoise and index. Refused now, naming each
  key and what sets that instead; `--show-config` leaves them out (and its output still reads back).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tests.refusals import assert_raised, refusal

pytestmark = [pytest.mark.cli]
runner = CliRunner()
CODEC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "benchmarks", "weights", "codec")


def _png(arr: np.ndarray, mode: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG", **kw)
    return buf.getvalue()


def test_compress_drops_a_fully_opaque_alpha_channel_and_refuses_transparency(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    d = tmp_path / "in"
    d.mkdir()
    (d / "plain.png").write_bytes(_png(rgb, "RGB"))
    (d / "opaque.png").write_bytes(_png(np.dstack([rgb, np.full((32, 48), 255, np.uint8)]), "RGBA"))
    keyed = rgb.copy()
    keyed[keyed.sum(axis=2) == 0] = 1  # no pixel is the transparent colour: the tRNS chunk hides nothing
    (d / "unused_key.png").write_bytes(_png(keyed, "RGB", transparency=(0, 0, 0)))
    res = runner.invoke(app, ["compress", str(d / "plain.png"), str(d / "opaque.png"), str(d / "unused_key.png"),
                              "--model", CODEC, "-o", str(tmp_path / "codes")])
    assert res.exit_code == 0, res.output
    assert "fully opaque alpha channel" in res.output, res.output
    plain, opaque = ((tmp_path / "codes" / f"{n}.aec").read_bytes() for n in ("plain", "opaque"))
    assert opaque == plain, "the same pixels, the same file: the alpha channel is dropped, nothing else changes"
    assert (tmp_path / "codes" / "unused_key.aec").exists()

    seen = np.dstack([rgb, np.full((32, 48), 255, np.uint8)])
    seen[0, 0, 3] = 254  # one pixel not quite opaque: refused, nothing written
    (d / "glass.png").write_bytes(_png(seen, "RGBA"))
    res = runner.invoke(app, ["compress", str(d / "glass.png"), "--model", CODEC, "-o", str(tmp_path / "c2")])
    assert res.exit_code == 3 and "glass.png: image has an alpha channel (mode RGBA) and transparent pixels" in \
        res.output, res.output
    assert not (tmp_path / "c2").exists()


@refusal("aeflow run compress/denoise/index with a setting the application never reads (--set model.latent_dim=4 "
         "for compress: its codec has its own)", 2, "configuration")
def test_settings_an_application_never_reads_are_refused(tmp_path):
    from tasks.apps import load_all
    from tasks.config import annotated_yaml, resolve_config
    from tasks.errors import ConfigError

    apps = load_all()
    with pytest.raises(ConfigError) as e:
        resolve_config(apps["compress"].RunConfig, sets=["model.latent_dim=4", "preprocess.scaler=minmax"])
    assert_raised(e.value, test_settings_an_application_never_reads_are_refused, "not used by compress",
                  "model.latent_dim=4", "preprocess.scaler='minmax'", "app.codec")
    for name in ("denoise", "index"):
        with pytest.raises(ConfigError, match=rf"not used by {name}.*preprocess\.max_categories=7"):
            resolve_config(apps[name].RunConfig, sets=["preprocess.max_categories=7"])
        # what it does read is still taken
        assert resolve_config(apps[name].RunConfig, sets=["preprocess.val_fraction=0.3"]).preprocess.val_fraction == 0.3
    for name, application in apps.items():
        shown = annotated_yaml(application.RunConfig())
        (tmp_path / f"{name}.yaml").write_text(shown)
        assert resolve_config(application.RunConfig, file=tmp_path / f"{name}.yaml") == application.RunConfig()
        # every key says what it is (model.activation, dropout, batch_norm, train.lr had no comment)
        bare = [line.strip() for line in shown.splitlines() if "  # " not in line and not line.endswith(":")]
        assert not bare, f"{name} --show-config: keys without a description: {bare}"
        read = yaml.safe_load(shown)
        for path in application.RunConfig.UNUSED:
            section, *key = path.split(".")
            assert (key[0] not in read[section]) if key else (section not in read), f"{name} --show-config: {path}"
    # a tabular application reads both sections: nothing refused there
    assert resolve_config(apps["reduce"].RunConfig, sets=["preprocess.scaler=minmax", "model.latent_dim=3"])


def test_a_parquet_inputs_schema_sample_spans_its_first_files(tmp_path):
    """The Parquet sample was the first file's first row group alone, so how a table was cut decided its
    columns' kinds: a text column of numbers (\"12.5\") whose 3 first values were null was categorical when
    the first row group (or file) held just those 3 rows, numeric when it held them all. Sampled over row
    groups and files (as for CSV), every cut of the same rows gives the same schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.config import LoadConfig
    from tasks.load import inspect_table

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    first = pa.table({"x": pa.array(rng.normal(size=3)), "size": pa.array([None] * 3, pa.string())})
    second = pa.table({"x": pa.array(rng.normal(size=300)),
                       "size": pa.array([f"{v:.1f}" for v in rng.uniform(1, 50, 300)], pa.string())})
    pq.write_table(pa.concat_tables([first, second]), tmp_path / "whole.parquet")
    pq.write_table(pa.concat_tables([first, second]), tmp_path / "groups.parquet", row_group_size=3)
    pq.write_table(first, tmp_path / "in" / "a.parquet")
    pq.write_table(second, tmp_path / "in" / "b.parquet", row_group_size=100)

    def kinds(uri: str) -> dict[str, str]:
        return {f.name: f.kind for f in inspect_table(uri, LoadConfig(), allow_nulls=True).schema.features}

    assert kinds(str(tmp_path / "whole.parquet")) == {"x": "numeric", "size": "numeric"}
    assert kinds(str(tmp_path / "groups.parquet")) == kinds(str(tmp_path / "whole.parquet")), "row groups"
    assert kinds(str(tmp_path / "in")) == kinds(str(tmp_path / "whole.parquet")), "files"


def test_the_activation_settings_name_exactly_what_the_models_build():
    """The image applications' model.activation was a free string: `--set model.activation=tanh` (a dense
    activation, not a convolutional one) passed the configuration and failed only when the model was built,
    after the images were read. Both settings now list what their model builds, and are refused up front."""
    import typing

    import models.conv
    import models.dense
    from tasks.apps import load_all
    from tasks.config import ModelConfig, resolve_config
    from tasks.errors import ConfigError
    from tasks.apps.images_base import ConvModelConfig

    assert set(typing.get_args(ModelConfig.model_fields["activation"].annotation)) == set(models.dense.ACTIVATIONS)
    assert set(typing.get_args(ConvModelConfig.model_fields["activation"].annotation)) == set(models.conv.ACTIVATIONS)
    with pytest.raises(ConfigError, match=r"model\.activation: Input should be 'relu'.*\(got 'tanh'\)"):
        resolve_config(load_all()["denoise"].RunConfig, sets=["model.activation=tanh"])
