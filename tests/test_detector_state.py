"""Strict loading of saved detectors (issue 15, item 7), for every registered detector.

Each test writes a file that ``save_state`` makes consistent (a valid checksum), so that only the
check under test can refuse it: a stored value that the constructor refuses, a name that is not a
learned attribute (e.g. a tensor named ``score``, which would shadow the method), a tensor of the
wrong dtype or shape, and malformed headers. Every refusal is the one error type ``StateError``,
raised by ``ebood.load`` itself, before any scoring.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

import ebood
from ebood import detectors
from ebood.detectors._learned import HEADER_KEYS
from ebood.state import StateError, load_state, save_state

C, D = 4, 24
NAMES = detectors.available()
#: hyperparameters that the small data needs (where the detector has them)
SMALL = {"dim": 6, "k": 5, "epochs": 3, "progress": False}  # (msma: a short training)
#: values of the wrong type or range, tried on every hyperparameter
BAD_VALUES = (-5, 0, "x", [1, 2], {"a": 1}, 1e400, True)


def outputs(seed: int, n: int) -> ebood.Outputs:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(C, D, generator=torch.Generator().manual_seed(1)) * 2
    labels = torch.arange(n) % C
    features = torch.relu(centres[labels] + 0.5 * torch.randn(n, D, generator=g))
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(2)) / 5 + (centres - centres.mean(0))
    head = ebood.Head(w, torch.zeros(C))
    return ebood.Outputs(logits=head(features), features=features, labels=labels, head=head)


TRAIN, TEST = outputs(0, 160), outputs(1, 40)


def params(name: str) -> dict:
    names = detectors.get(name).hyperparameter_names()
    return {k: v for k, v in SMALL.items() if k in names}


def is_model_level(name: str) -> bool:
    return "model" in detectors.get(name).requires


def fitted(name: str):
    det = detectors.create(name, **params(name))
    if det.needs_fit or not is_model_level(name):
        det.fit(TRAIN)  # mahalanobis_ensemble fits from penultimate features; ASH / SCALE keep the head
    return det


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (tensors, header) of a fitted, calibrated detector's file."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name in NAMES:
        det = fitted(name)
        if not is_model_level(name):
            det.calibrate(TEST)
        out[name] = load_state(det.save(root / f"{name}.safetensors"))
    return out


def write(tmp_path, tensors, header) -> str:
    """A file with a valid checksum (only the content is wrong)."""
    return save_state(tmp_path / "edited.safetensors", tensors, header)


def refused(path, *words: str) -> str:
    with pytest.raises(StateError) as info:
        ebood.load(path)
    message = str(info.value)
    for w in words:
        assert w in message, message
    return message


# ----- round trip: the declaration matches what fit produces -------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_learned_attribute_is_declared_with_its_dtype_and_shape(name, files, tmp_path):
    tensors, header = files[name]
    spec = detectors.get(name)._state_spec()
    stored = set(tensors) | set(header["learned"])
    assert {k.split("/")[0] for k in stored} <= set(spec)
    det = ebood.load(write(tmp_path, tensors, header))
    for key, value in det._learned().items():
        assert key in spec
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, tensors[key])


# ----- hyperparameters: the constructor's checks ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_stored_hyperparameter_goes_through_the_constructor(name, files, tmp_path):
    tensors, header = files[name]
    cls = detectors.get(name)
    tried = 0
    for param in cls.hyperparameter_names():
        for bad in BAD_VALUES:
            try:
                detectors.create(name, **{**params(name), param: bad})
            except (TypeError, ValueError):
                edited = dict(header, hyperparameters={**header["hyperparameters"], param: bad})
                refused(write(tmp_path, tensors, edited), "invalid hyperparameters", name)
                tried += 1
    if cls.hyperparameter_names():
        assert tried, f"no bad value refused by the constructor of {name}"
    edited = dict(header, hyperparameters={**header["hyperparameters"], "not_a_parameter": 1})
    refused(write(tmp_path, tensors, edited), "not_a_parameter")


def test_gen_with_a_stored_gamma_of_minus_5_is_refused(files, tmp_path):
    """The issue's reproduction: gamma=-5 (refused by the constructor) loaded and scored."""
    tensors, header = files["gen"]
    with pytest.raises(ValueError):
        detectors.create("gen", gamma=-5)
    refused(write(tmp_path, tensors, dict(header, hyperparameters={**header["hyperparameters"], "gamma": -5})), "gamma")
    # the same value smuggled in as a learned attribute, which load used to setattr after __init__
    refused(write(tmp_path, tensors, dict(header, learned={**header["learned"], "gamma": -5})), "unknown learned name", "'gamma'")


# ----- names: only the declared learned attributes ---------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_named_score_cannot_shadow_the_method(name, files, tmp_path):
    tensors, header = files[name]
    path = write(tmp_path, {**tensors, "score": torch.zeros(3)}, header)
    refused(path, "unknown learned name", "'score'")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key", ["score", "fit", "__class__", "_fitted", "threshold_", "name", "requires", "bogus_"])
def test_unknown_header_learned_names_are_refused(name, key, files, tmp_path):
    tensors, header = files[name]
    refused(write(tmp_path, tensors, dict(header, learned={**header["learned"], key: 1})), "unknown learned name", repr(key))


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_learned_value_is_named(name, files, tmp_path):
    tensors, header = files[name]
    required = [k for k, s in detectors.get(name).learned_state.items() if not s.optional]
    if not required or not detectors.get(name).needs_fit:
        pytest.skip(f"{name} learns nothing that it needs")
    for key in required:
        kept_t = {k: v for k, v in tensors.items() if k.split("/")[0] != key}
        kept_h = {k: v for k, v in header["learned"].items() if k != key}
        refused(write(tmp_path, kept_t, dict(header, learned=kept_h)), repr(key))


# ----- dtypes and shapes -------------------------------------------------------------------------


def test_a_knn_bank_stored_as_bool_is_refused(files, tmp_path):
    """The issue's reproduction: a bool bank loaded and gave impossible distances."""
    tensors, header = files["knn"]
    refused(write(tmp_path, dict(tensors, bank_=tensors["bank_"] > 0), header), "bank_", "dtype bool")


@pytest.mark.parametrize("name", NAMES)
def test_every_tensor_with_a_wrong_dtype_is_refused(name, files, tmp_path):
    tensors, header = files[name]
    if not tensors:
        pytest.skip(f"{name} keeps no tensors")
    for key, t in tensors.items():
        wrong = (torch.bool, torch.int64) if t.is_floating_point() else (torch.bool, torch.float32)
        if t.dtype == torch.float64:
            wrong += (torch.float32,)  # float64 sums must stay float64
        for dtype in wrong:
            refused(write(tmp_path, dict(tensors, **{key: t.to(dtype)}), header), key.split("/")[0], "dtype")


@pytest.mark.parametrize("name", NAMES)
def test_every_tensor_with_a_wrong_shape_is_refused_at_load(name, files, tmp_path):
    tensors, header = files[name]
    if not tensors:
        pytest.skip(f"{name} keeps no tensors")
    for key, t in tensors.items():
        if key == "index_bytes_" or t.numel() == 0:
            continue  # an opaque byte string: its length is free (a corrupt index is a separate test)
        grown = torch.cat([t, t.narrow(0, 0, 1)], dim=0)
        refused(write(tmp_path, dict(tensors, **{key: grown}), header), key.split("/")[0])
        refused(write(tmp_path, dict(tensors, **{key: t.reshape(-1)[:1].reshape([1] * (t.ndim + 1))}), header), key.split("/")[0])


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_learned_values_are_refused(name, files, tmp_path):
    tensors, header = files[name]
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel():
            bad = t.clone().reshape(-1)
            bad[0] = math.nan
            refused(write(tmp_path, dict(tensors, **{key: bad.reshape(t.shape)}), header), key.split("/")[0], "non-finite")
    for key, value in header["learned"].items():
        if isinstance(value, float):
            refused(write(tmp_path, tensors, dict(header, learned={**header["learned"], key: math.inf})), key)


def test_knn_with_a_corrupt_hnsw_index_is_refused(tmp_path):
    pytest.importorskip("faiss")
    det = detectors.create("knn", k=5, index="hnsw").fit(TRAIN)
    tensors, header = load_state(det.save(tmp_path / "knn.safetensors"))
    refused(write(tmp_path, dict(tensors, index_bytes_=tensors["index_bytes_"][:100]), header), "index")


# ----- malformed headers: one error type ---------------------------------------------------------


def malformed(header: dict) -> list[tuple[str, dict]]:
    """(what, header) pairs, each wrong in one way."""
    cases = [(f"without {k!r}", {kk: v for kk, v in header.items() if kk != k}) for k in HEADER_KEYS]
    for key, values in {
        "detector": [123, ["knn"], {"a": 1}, None, "no_such_detector"],
        "hyperparameters": [[], "x", None, 3],
        "learned": [[], "x", None, 3],
        "fitted": ["yes", 1, None],
        "threshold": ["0.5", True, [1], {"t": 1}, math.nan, math.inf],
        "ebood_version": [1, None],
    }.items():
        cases += [(f"{key}={v!r}", dict(header, **{key: v})) for v in values]
    cases.append(("an unknown header key", dict(header, extra=1)))
    learned = header["learned"]
    for v in [{"__tensor_dict__": 5}, {"__tensor_dict__": ["missing"]}, {"other": 1}, {"__tensor_dict__": [1]}]:
        key = next(iter(learned), "bank_")
        cases.append((f"learned {key}={v!r}", dict(header, learned={**learned, key: v})))
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_malformed_headers_all_raise_state_error(name, files, tmp_path):
    tensors, header = files[name]
    for what, bad in malformed(header):
        with pytest.raises(StateError):
            ebood.load(write(tmp_path, tensors, bad))
        assert what  # (the case's description, shown by pytest on failure)


def raw_file(tmp_path, ebood_json: str, tensors=None) -> str:
    path = tmp_path / "raw.safetensors"
    path.write_bytes(st_save(tensors or {"t": torch.zeros(1)}, metadata={"ebood": ebood_json}))
    return path


def test_deeply_nested_headers_raise_state_error_not_recursion_error(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    for doc in (deep, json.dumps({"format_version": 1, "format": "ebood.detector"})[:-1] + ', "learned": ' + deep + "}"):
        message = refused(raw_file(tmp_path, doc))
        assert "RecursionError" in message or "header" in message


def test_header_that_is_not_an_object_or_not_json(tmp_path):
    for doc in ("[1, 2]", "nonsense", '"text"', "null"):
        refused(raw_file(tmp_path, doc))


def test_cli_score_with_a_malformed_detector_file_prints_one_line(files, tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from ebood.cli import app, load_commands

    load_commands()
    tensors, header = files["knn"]
    det_path = write(tmp_path, {**tensors, "score": torch.zeros(3)}, header)
    data = tmp_path / "test.npz"
    np.savez(data, features=TEST.features.numpy(), logits=TEST.logits.numpy())
    res = CliRunner().invoke(app, ["score", str(data), "--detector", str(det_path), "-o", str(tmp_path / "s.npy")])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("ebood: error:") and "'score'" in lines[0], res.output


# ----- model-level detectors keep the same contract ------------------------------------------------


def test_a_model_level_detector_round_trips_and_is_checked(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(30, 3, 2, 2)
    y = torch.arange(30) % 3
    det = detectors.create("mahalanobis_ensemble", epsilon=0.0).fit_inputs(model, torch.utils.data.TensorDataset(x, y))
    path = det.save(tmp_path / "me.safetensors")
    assert torch.equal(ebood.load(path).score_inputs(model, x), det.score_inputs(model, x))
    tensors, header = load_state(path)
    refused(write(tmp_path, tensors, dict(header, learned={**header["learned"], "layers_": ["elsewhere"]})), "layers")
    refused(write(tmp_path, tensors, dict(header, learned={**header["learned"], "weighting_": "magic"})), "weighting_")
