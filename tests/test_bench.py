"""ebood bench: the built-in benchmark, TOML protocols, presets on tiny official-format files, the CLI."""

from __future__ import annotations

import csv
import json
import struct

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ebood import metrics
from ebood.bench.builtin import run_builtin, torch_threads
from ebood.bench.config import ConfigError, DetectorSpec, load_config, parse_config
from ebood.bench.presets import available_presets, load_preset
from ebood.bench.protocol import run_config
from ebood.cli import app, load_commands

# mc_dropout is stochastic: the warm run (no training, so less of torch's random stream used) must still match
FAST = [DetectorSpec("energy"), DetectorSpec("msp"), DetectorSpec("mahalanobis"), DetectorSpec("mc_dropout", {"passes": 3})]
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def builtin_result(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return run_builtin(seed=0, cache_dir=cache, detectors=FAST, progress=False), cache


def _mean(rows, model, detector, metric="fpr95", groups=("near", "far")):
    vals = [r[metric] for r in rows if r["model"] == model and r["detector"] == detector and r["group"] in groups]
    return float(np.mean(vals))


def test_builtin_rows_are_the_metrics_of_the_saved_scores(builtin_result, tmp_path):
    result, _ = builtin_result
    result.save(tmp_path)
    scores = load_file(str(tmp_path / "scores.safetensors"))
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["rows"] == result.rows and len(doc["rows"]) > 0
    groups = {r["group"] for r in doc["rows"]}
    assert groups == {"near", "far", "covariate"}
    for row in doc["rows"]:
        id_s = scores[f"{row['model']}/{row['detector']}/id_test"].double().numpy()
        ood_s = scores[f"{row['model']}/{row['detector']}/{row['ood_set']}"].double().numpy()
        y = np.r_[np.zeros(id_s.size), np.ones(ood_s.size)]
        from sklearn.metrics import roc_auc_score

        assert row["auroc"] == pytest.approx(roc_auc_score(y, np.r_[id_s, ood_s]), abs=1e-6)
        assert row["fpr95"] == pytest.approx(metrics.fpr_at_tpr(id_s, ood_s), abs=1e-12)
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(doc["rows"])
    assert float(csv_rows[0]["auroc"]) == pytest.approx(doc["rows"][0]["auroc"], rel=1e-12)
    for key in ("config", "versions", "device", "seed", "timings", "models", "ood_sets", "auxiliary_outliers"):
        assert key in doc
    assert set(doc["timings"]) >= {"training", "extraction", "fitting", "scoring", "total"}
    assert set(doc["models"]) == {"pretrained", "energy_finetuned", "oe_finetuned", "logitnorm", "palm", "openset"}


def test_builtin_has_logitnorm_and_palm_rows_with_training_times(builtin_result):
    result, _ = builtin_result
    detectors_of = lambda m: {r["detector"] for r in result.rows if r["model"] == m}  # noqa: E731
    assert detectors_of("logitnorm") == {"msp", "energy", "max_logit", "entropy"}
    assert detectors_of("palm") == {"knn", "mahalanobis"}
    for name in ("logitnorm", "palm"):
        assert 0 < result.models[name]["training_seconds"] <= 120  # ~10-40 s on a loaded 2-core machine
        assert result.models[name]["id_accuracy"] > 0.85
    assert set(result.models["pretrained"]["fit_seconds"]) == {"mahalanobis"}  # of FAST, the one that learns


def test_builtin_finetuning_improves_the_score_it_targets(builtin_result):
    """The energy paper's claim on the built-in benchmark: fine-tuning lowers FPR95, ID accuracy stays."""
    result, _ = builtin_result
    rows = result.rows
    assert _mean(rows, "energy_finetuned", "energy") < _mean(rows, "pretrained", "energy")
    assert _mean(rows, "oe_finetuned", "msp") < _mean(rows, "pretrained", "msp")
    acc = {k: v["id_accuracy"] for k, v in result.models.items()}
    assert acc["pretrained"] > 0.9
    assert abs(acc["energy_finetuned"] - acc["pretrained"]) <= 0.01 + 1e-9
    assert abs(acc["oe_finetuned"] - acc["pretrained"]) <= 0.01 + 1e-9


def test_builtin_is_deterministic_and_cached(builtin_result, tmp_path):
    """A second run from an empty cache trains again and gives the same numbers; a warm run trains nothing."""
    result, cache = builtin_result
    fresh = run_builtin(seed=0, cache_dir=tmp_path, detectors=FAST, finetuned=False, open_set=False, other_losses=False, progress=False)
    pre = [r for r in result.rows if r["model"] == "pretrained"]
    assert fresh.rows == pre
    warm = run_builtin(seed=0, cache_dir=cache, detectors=FAST, open_set=False, progress=False)
    assert warm.timings["training"] == 0.0
    assert warm.timings["fitting"] == warm.timings["scoring"] == 0.0  # every score came from the cache, and the notes say so
    assert not [n for n in result.notes if "from the cache" in n]
    assert [n for n in warm.notes if n.startswith("detector scores of pretrained, energy_finetuned, oe_finetuned")]
    assert [r for r in warm.rows if r["model"] != "openset"] == [r for r in result.rows if r["model"] != "openset"]


def test_model_initialisation_depends_on_the_seed_alone(tmp_path):
    """The open-set model trained after a cached pre-trained model (nothing trained before it) equals
    the one trained after training the pre-trained model in the same process."""
    detectors = [DetectorSpec("energy")]
    quick = dict(detectors=detectors, finetuned=False, other_losses=False, progress=False)
    run_builtin(seed=0, cache_dir=tmp_path / "a", open_set=False, **quick)
    after_cached = run_builtin(seed=0, cache_dir=tmp_path / "a", **quick)
    after_training = run_builtin(seed=0, cache_dir=tmp_path / "b", **quick)
    openset = lambda r: [row for row in r.rows if row["model"] == "openset"]  # noqa: E731
    assert openset(after_cached) and openset(after_cached) == openset(after_training)


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ----- TOML protocols ------------------------------------------------------------------------------

DIGITS_TOML = """
name = "digits-grid"
seed = 0
repeats = 3
ood_samples = 200

[model]
architecture = "digits_cnn"
num_classes = 10
train = {{ epochs = 3, lr = 0.01, optimizer = "adam", batch_size = 64 }}

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
grid = {{ percentile = [50, 90] }}

[finetune]
outliers = "builtin:outliers"
epochs = 1
id_batch_size = 64
outlier_batch_size = 64
lr = 0.01
energy = {{ m_in = -15.0, m_out = -4.0 }}
{extra}
"""


def test_toml_protocol_selects_grid_on_validation_and_fine_tunes(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text(DIGITS_TOML.format(extra=""))
    config = load_config(path)
    result = run_config(config, cache_dir=tmp_path / "cache", progress=False)
    assert set(result.models) == {"pretrained", "energy_finetuned"}
    chosen = result.selected["pretrained/react"]["percentile"]
    assert chosen in (50, 90)
    # the selection used the validation outliers only: recompute it from the candidates' scores
    assert {r["detector"] for r in result.rows if r["model"] == "pretrained"} == {"energy", "react"}
    # repeats of 200-sample subsets: the metric is the mean of subsets, different from the full-set value
    row = next(r for r in result.rows if r["detector"] == "energy" and r["ood_set"] == "letters" and r["model"] == "pretrained")
    full = metrics.evaluate(result.scores["pretrained/energy/id_test"], result.scores["pretrained/energy/letters"])
    assert row["auroc"] == pytest.approx(full["auroc"], abs=0.05)
    rng = np.random.default_rng(config.seed)
    ood = result.scores["pretrained/energy/letters"].double().numpy()
    expected = np.mean([metrics.auroc(result.scores["pretrained/energy/id_test"], ood[rng.choice(ood.size, 200, replace=False)])
                        for _ in range(3)])
    assert row["auroc"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.replace('[data.ood.near]\nletters = "builtin:letters"\n[data.ood.far]\nuniform = "builtin:uniform"\n', ""), "ood"),
        (lambda s: s.replace('[data.ood.far]\nuniform = "builtin:uniform"\n', "").replace("[data.ood.near]", "[data.ood.covariate]"), "no near or far"),
        (lambda s: s.replace('architecture = "digits_cnn"', 'architecture = "digits_cnn"\ntorchscript = "m.pt"'), "exactly one"),
        (lambda s: s.replace("repeats = 3", "repeats = 0"), "repeats"),
        (lambda s: s.replace("[data.ood.far]", "[data.ood.farr]"), "unknown group"),
        (lambda s: s.replace("grid = {{ percentile = [50, 90] }}", "grid = {{ percentile = [] }}"), "grid"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, edit, match):
    path = tmp_path / "bad.toml"
    path.write_text(edit(DIGITS_TOML).format(extra=""))
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such benchmark file"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "x.toml")


def test_grid_without_validation_sets_is_refused(tmp_path):
    doc = DIGITS_TOML.format(extra="").replace('[data.ood_validation]\noutliers = "builtin:outliers"\n', "")
    path = tmp_path / "b.toml"
    path.write_text(doc)
    with pytest.raises(ValueError, match="validation OOD"):
        run_config(load_config(path), cache_dir=tmp_path / "c", progress=False)


# ----- presets on tiny files in the official formats -------------------------------------------------

def _cifar_bin(path, n, label_bytes, classes):
    raw = b""
    for _ in range(n):
        labels = bytes(int(RNG.integers(0, c)) for c in classes)
        raw += labels + RNG.integers(0, 256, 3072, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)


def _images(folder, n, size=36, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}{suffix}")


def _idx(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(1, 6):
        _cifar_bin(root / "cifar-10-batches-bin" / f"data_batch_{i}.bin", 4, 1, [10])
    _cifar_bin(root / "cifar-10-batches-bin" / "test_batch.bin", 12, 1, [10])
    _cifar_bin(root / "cifar-100-binary" / "train.bin", 12, 2, [20, 100])
    _cifar_bin(root / "cifar-100-binary" / "test.bin", 12, 2, [20, 100])
    (root / "svhn").mkdir()
    scipy.io.savemat(root / "svhn" / "test_32x32.mat", {"X": RNG.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8),
                                                        "y": RNG.integers(1, 11, (6, 1)).astype(np.uint8)})
    _images(root / "dtd" / "images" / "banded", 6, suffix=".jpg")
    _images(root / "places365" / "a" / "airfield", 6, suffix=".jpg")
    _images(root / "LSUN_C", 6, suffix=".jpg")
    _images(root / "LSUN_resize", 6, suffix=".jpg")
    _images(root / "iSUN", 6, suffix=".jpeg")
    _idx(root / "t10k-images-idx3-ubyte", RNG.integers(0, 256, (6, 28, 28)))
    _idx(root / "t10k-labels-idx1-ubyte", RNG.integers(0, 10, (6,)))
    top = root / "tiny-imagenet-200"
    (top / "val" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("n01\nn02\n")
    lines = []
    for k in range(4):
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(top / "val" / "images" / f"val_{k}.JPEG", format="PNG")
        lines.append(f"val_{k}.JPEG\tn0{k % 2 + 1}\t0\t0\t63\t63")
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_presets_are_valid():
    assert set(available_presets()) >= {"cifar10-energy", "cifar100-energy", "openood-cifar10", "openood-cifar100"}
    c10 = load_preset("cifar10-energy")
    assert c10.ood_samples == 2000 and c10.positive == "id"
    assert {n for n, (g, _) in c10.ood.items()} == {"textures", "svhn", "places365", "lsun_crop", "lsun_resize", "isun"}
    assert c10.reference["pretrained/energy"] == 33.01 and c10.reference["energy_finetuned/energy"] == 3.32
    o10 = load_preset("openood-cifar10")
    assert o10.positive == "ood"
    assert {n for n, (g, _) in o10.ood.items() if g == "near"} == {"cifar100", "tinyimagenet"}


@pytest.mark.parametrize("preset, arch", [("cifar10-energy", "wrn40_2"), ("openood-cifar10", "resnet18_cifar")])
def test_preset_runs_on_tiny_official_files(preset, arch, data_root, tmp_path):
    from ebood.models import load_model
    from ebood.train import save_weights

    config = load_preset(preset)
    torch.manual_seed(0)
    ckpt = save_weights(load_model(arch, None, **config.model.kwargs), tmp_path / "w.safetensors")
    runner = CliRunner()
    load_commands()
    out = tmp_path / "out"
    detectors = "msp,energy,mahalanobis" if preset == "cifar10-energy" else "msp,energy,vim,fdbd"
    res = runner.invoke(app, ["bench", preset, "--root", str(data_root), "--checkpoint", str(ckpt), "--output", str(out),
                              "--cache-dir", str(tmp_path / "c"), "--detectors", detectors, "--figures", "none", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert {r["ood_set"] for r in doc["rows"]} == set(config.ood)
    assert doc["positive"] == config.positive
    assert doc["config"]["reference"]
    assert (out / "report.html").is_file()


def test_preset_without_checkpoint_says_what_to_pass(data_root, tmp_path):
    load_commands()
    res = CliRunner().invoke(app, ["bench", "cifar10-energy", "--root", str(data_root), "--output", str(tmp_path / "o"), "-q"])
    assert res.exit_code != 0
    assert "--checkpoint" in res.output and "Traceback" not in res.output


def test_preset_with_missing_data_lists_expected_files(tmp_path):
    load_commands()
    res = CliRunner().invoke(app, ["bench", "cifar10-energy", "--root", str(tmp_path), "--output", str(tmp_path / "o"), "-q"])
    assert res.exit_code != 0
    assert "cifar-10-batches-bin" in res.output and "Traceback" not in res.output


def test_cli_lists_and_shows_presets():
    load_commands()
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--list-presets"])
    assert res.exit_code == 0 and "cifar10-energy" in res.output
    res = runner.invoke(app, ["bench", "--show-preset", "openood-cifar10"])
    assert res.exit_code == 0
    parse_config(__import__("tomllib").loads(res.output))  # a valid starting point
    res = runner.invoke(app, ["bench", "cifar10-enrgy"])
    assert res.exit_code != 0 and "cifar10-energy" in res.output


def test_cli_builtin_bench_writes_every_file(builtin_result, tmp_path):
    _, cache = builtin_result
    load_commands()
    out = tmp_path / "res"
    res = CliRunner().invoke(app, ["bench", "--cache-dir", str(cache), "--output", str(out), "--detectors", "energy,msp,mahalanobis", "-q"])
    assert res.exit_code == 0, res.output
    for name in ("results.json", "results.csv", "scores.safetensors", "report.html"):
        assert (out / name).is_file(), name
    assert "energy_finetuned" in res.output and "letters" in res.output


def test_builtin_principal_space_detectors_score_the_pretrained_model(tmp_path):
    """ViM and Residual run with a principal dimension the digits CNN's features determine (the default
    D / 2 exceeds their rank, a degenerate fit that would leave the main model without their rows)."""
    import warnings

    from ebood.bench.builtin import DETECTOR_SETTINGS

    specs = [DETECTOR_SETTINGS["vim"], DETECTOR_SETTINGS["residual"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_builtin(seed=0, cache_dir=tmp_path, detectors=specs, finetuned=False, open_set=False, other_losses=False,
                             progress=False)
    assert not [w for w in caught if "principal space is not determined" in str(w.message)]
    for name in ("vim", "residual"):
        rows = [r for r in result.rows if r["detector"] == name]
        assert {r["ood_set"] for r in rows} == set(result.ood_sets) and all(np.isfinite(r["fpr95"]) for r in rows)
