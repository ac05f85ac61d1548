"""Configuration mistakes as users make them (a YAML file or --set with a misspelt key): one line naming the
key, and the key that was probably meant."""

from __future__ import annotations

import pytest

from tasks.apps import get_app
from tasks.config import ConfigError, resolve_config

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
