"""Configuration mistakes as users make them (a YAML file or --set with a misspelt key): one line naming the
key, and the key that was probably meant."""

from __future__ import annotations

import pytest

from tasks.apps import get_app
from tasks.config import ConfigError, resolve_config
from tests.refusals import assert_raised, refusal

pytestmark = pytest.mark.tasks


@pytest.mark.parametrize("sets, said", [
    (["train.epoch=2"], "train.epoch: Extra inputs are not permitted (did you mean 'train.epochs'?) (got 2)"),
    (["load.id_colum=rid"], "load.id_column'?)"),
    (["model.latent=3"], "(did you mean 'model.latent_dim'?)"),
    (["app.trust_sampel=3"], "(did you mean 'app.trust_sample'?)"),
    (["trian.epochs=2"], "trian: Extra inputs are not permitted (did you mean 'train'?)"),
])
def test_a_misspelt_key_names_the_key_that_was_meant(sets, said):
    """It said only "Extra inputs are not permitted": a long --show-config listing to search by eye."""
    with pytest.raises(ConfigError) as e:
        resolve_config(get_app("reduce").RunConfig, options={"load.input": "x.csv"}, sets=sets)
    assert said in str(e.value)
    assert "exclude_columns" not in str(e.value)


def test_a_key_of_another_application_suggests_nothing():
    with pytest.raises(ConfigError) as e:
        resolve_config(get_app("extract").RunConfig, options={"load.input": "x.csv"}, sets=["app.min_steps=10"])
    assert str(e.value) == "invalid configuration: app.min_steps: Extra inputs are not permitted (got 10)"


# Found by a walkthrough of the CLI's configuration surface (2026-12-03).

@refusal("a config file giving a section a value (train: 5): named with the file", 2, "configuration")
def test_a_section_given_a_value_in_the_file_is_said_of_the_file(tmp_path):
    """`train: 5` in a config file with --epochs given was refused as "--set train.epochs: 'train' is not a section"
    (no --set given, no file named)."""
    (tmp_path / "c.yaml").write_text("train: 5\n")
    for options in ({"load.input": "x.csv", "train.epochs": 2}, {"load.input": "x.csv"}):
        with pytest.raises(ConfigError) as e:
            resolve_config(get_app("reduce").RunConfig, file=tmp_path / "c.yaml", options=options)
        assert str(e.value) == (f"config file {str(tmp_path / 'c.yaml')!r}: 'train' must be a section (train: "
                                "followed by indented 'key: value' lines), got 5")
        assert_raised(e.value, test_a_section_given_a_value_in_the_file_is_said_of_the_file)


@pytest.mark.parametrize("sets", [["train.lr=inf"], ["train.lr=.inf"], ["train.weight_decay=.nan"],
                                  ["preprocess.val_fraction=.nan"]])
@refusal("a setting that is not a finite number (--lr inf, --set train.weight_decay=.nan)", 2, "configuration")
def test_numbers_that_are_not_finite_are_refused(sets):
    """`--lr inf` passed (inf > 0) and the run failed in training as a "bug", with Prefect's tracebacks."""
    with pytest.raises(ConfigError, match=r"should be a finite number") as e:
        resolve_config(get_app("reduce").RunConfig, options={"load.input": "x.csv"}, sets=sets)
    assert_raised(e.value, test_numbers_that_are_not_finite_are_refused)


@pytest.mark.parametrize("raw, kept", [("007", "007"), ("12:30", "12:30"), ("0x1F", "0x1F"), ("1_000", "1_000"),
                                       ("2024-01-01", "2024-01-01"), ("42", "42"), ("-3.5", "-3.5")])
def test_set_keeps_a_text_setting_as_written(raw, kept):
    """YAML 1.1 read `--set load.id_column=007` as 7 (the column "7", where --id-column 007 is "007"), 12:30 as 750,
    0x1F as 31, 2024-01-01 as a date (refused as not a string)."""
    cfg = resolve_config(get_app("reduce").RunConfig, options={"load.input": "x.csv"},
                         sets=[f"load.id_column={raw}", f"load.label_column={raw}x"])
    assert cfg.load.id_column == kept and cfg.load.label_column == f"{kept}x"


def test_set_still_reads_numbers_and_null_for_numeric_and_list_settings():
    cfg = resolve_config(get_app("reduce").RunConfig, options={"load.input": "x.csv"},
                         sets=["train.epochs=007", "train.batch_size=1_000", "train.lr=1.0e-3", "preprocess.val_fraction=.25",
                               "model.hidden=null"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.preprocess.val_fraction) == (7, 1000, 1e-3, 0.25)
    assert cfg.model.hidden == (), "null is none, as --hidden none (it was refused as not a tuple)"


@refusal("an empty --output (-o \"$OUT\" with OUT unset; it wrote into the working directory)", 2, "configuration")
def test_an_empty_output_is_refused():
    """`-o "$OUT"` with OUT unset wrote the run into the working directory."""
    with pytest.raises(ConfigError, match=r"output: empty \(an unset variable\?\)") as e:
        resolve_config(get_app("reduce").RunConfig, options={"load.input": "x.csv", "output": ""})
    assert_raised(e.value, test_an_empty_output_is_refused)
    from tasks.storage import ArtifactStore

    with pytest.raises(ConfigError, match=r"--output is empty"):
        ArtifactStore(" ")


@refusal("a learning rate so high that training diverges (its loss NaN or infinite): the message gives a lower --lr",
         2, "configuration")
def test_a_training_that_diverges_is_a_setting_to_change_not_a_bug():
    """A loss that became NaN raised FloatingPointError: reported as kind "bug" (exit 1), with tracebacks."""
    import numpy as np

    from models.dense import DenseAEConfig, DenseAutoencoder
    from tasks.config import TrainConfig
    from tasks.errors import TrainingDiverged
    from tasks.train import train_model

    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    cfg = TrainConfig(epochs=3, patience=5, batch_size=16, threads=1, lr=1e30)
    with pytest.raises(TrainingDiverged) as e:
        train_model(DenseAutoencoder(DenseAEConfig(6, 2, (8,))), x, x[:8], cfg, run=None, label="reduce",
                    show_progress=False)
    assert_raised(e.value, test_a_training_that_diverges_is_a_setting_to_change_not_a_bug)
    assert isinstance(e.value, ConfigError)
    assert str(e.value).startswith("reduce: training diverged: validation loss is nan at epoch 1")
    assert str(e.value).endswith("(train.lr = 1e+30: e.g. --lr 1e+29)")
