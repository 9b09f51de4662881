"""A benchmark whose model barely classifies its own data says so (issue 16, item 14): a warning during
the run, a note in results.json and under the terminal table; the grid's choices and the published
numbers are printed in the terminal too."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from ebood.bench.config import ConfigError, load_config, parse_config
from ebood.bench.protocol import run_config
from ebood.bench.runner import ACCURACY_MARGIN, id_accuracy_warning
from ebood.cli import app, load_commands

# A custom benchmark whose model is trained with a learning rate too small to learn anything.
BAD_TOML = """
name = "digits-untrained"
seed = 0
expected_id_accuracy = 0.95

[model]
architecture = "digits_cnn"
num_classes = 10
train = { epochs = 1, lr = 1e-9, optimizer = "sgd", batch_size = 256 }

[data]
id_train = "builtin:digits-train"
id_test = "builtin:digits-test"
[data.ood.near]
letters = "builtin:letters"
[data.ood.far]
uniform = "builtin:uniform"
[data.ood_validation]
outliers = "builtin:outliers"

[[detectors]]
name = "energy"
[[detectors]]
name = "react"
grid = { percentile = [50, 90] }

[reference]
source = "a made-up paper"
metric = "fpr95"
"pretrained/energy" = 12.34
"""


@pytest.mark.parametrize(
    "accuracy, expected, classes, warns",
    [
        (0.18, 0.95, 10, True),  # the case
        (0.95 - ACCURACY_MARGIN - 0.001, 0.95, 10, True),
        (0.95 - ACCURACY_MARGIN + 0.001, 0.95, 10, False),
        (0.99, 0.95, 10, False),
        (0.18, None, 10, True),  # no expectation: below twice chance
        (0.21, None, 10, False),
        (0.015, None, 100, True),
        (0.18, None, None, False),  # nothing to compare with
        (None, 0.95, 10, False),  # no labels, no accuracy
    ],
)
def test_the_rule(accuracy, expected, classes, warns):
    message = id_accuracy_warning("m", accuracy, expected=expected, num_classes=classes)
    assert (message is not None) == warns
    if warns:
        assert message.startswith("m: ID accuracy") and f"{100 * accuracy:.1f}%" in message


def test_expected_accuracy_must_be_a_fraction():
    doc = __import__("tomllib").loads(BAD_TOML)
    assert parse_config(doc).expected_id_accuracy == 0.95
    for bad in (95, 0, "high", True):
        with pytest.raises(ConfigError, match="expected_id_accuracy"):
            parse_config({**doc, "expected_id_accuracy": bad})


def test_presets_state_their_expected_accuracy():
    from ebood.bench.presets import available_presets, preset_path

    for name in available_presets():
        if name.startswith(("cifar", "openood")):
            assert 0.5 < load_config(preset_path(name)).expected_id_accuracy < 1, name


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("untrained")
    (tmp / "bench.toml").write_text(BAD_TOML)
    return tmp


def test_an_untrained_model_warns_and_is_noted(bad_run, one_thread):
    with pytest.warns(UserWarning, match="far below the 95.0% this benchmark expects") as caught:
        result = run_config(load_config(bad_run / "bench.toml"), cache_dir=bad_run / "cache", progress=False)
    accuracy = result.models["pretrained"]["id_accuracy"]
    assert accuracy < 0.95 - ACCURACY_MARGIN
    assert f"{100 * accuracy:.1f}%" in str(caught[0].message)
    assert result.notes == [str(caught[0].message)]


def test_cli_prints_the_warning_grid_choice_and_published_numbers(bad_run, one_thread):
    load_commands()
    out = bad_run / "res"
    res = CliRunner().invoke(app, ["bench", str(bad_run / "bench.toml"), "--cache-dir", str(bad_run / "cache"),
                                   "--out", str(out), "--no-report", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    percentile = doc["selected_hyperparameters"]["pretrained/react"]["percentile"]
    assert f"grid choices (on validation OOD sets): pretrained/react: percentile={percentile}" in res.output
    assert "published: a made-up paper" in res.output
    energy_row = next(ln for ln in res.output.splitlines() if re.match(r"│\s*(pretrained)?\s*│ energy\s", ln))
    assert energy_row.split("│")[-3].strip() == "12.34"  # the published column, before ID accuracy
    assert doc["notes"] and doc["notes"][0].startswith("pretrained: ID accuracy")
    assert "note: pretrained: ID accuracy" in res.output and "far below" in res.output
