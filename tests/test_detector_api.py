"""The detector API, for every registered post-hoc detector: fit, score, calibrate, predict, save/load,
corrupt files, errors, streaming fit and merge, and the CLI round trip (`ebood fit` / `ebood score`)."""

import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from typer.testing import CliRunner

import ebood
from ebood import detectors
from ebood.cli import app, load_commands
from ebood.detectors import MissingFieldError, create
from ebood.state import StateError, load_state, save_state


def is_model_level(cls) -> bool:
    return "model" in cls.requires or hasattr(cls, "score_inputs")


NAMES = [n for n in detectors.available() if not is_model_level(detectors.get(n))]
STREAMING = [n for n in NAMES if detectors.get(n).streaming]
#: hyperparameters that the small test data needs (applied only where the detector has them)
SMALL_DATA_PARAMS = {"dim": 8, "k": 5, "epochs": 5, "n_components": 2}

C, D = 4, 48


def make_outputs(seed: int, n: int) -> ebood.Outputs:
    """Class-structured non-negative features, labels, a head, and logits = head(features)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(C, D, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(n) % C
    features = torch.relu(centres[labels] + 0.5 * torch.randn(n, D, generator=g))
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(7)) / math.sqrt(D) + (centres - centres.mean(0)) / 2
    b = torch.randn(C, generator=torch.Generator().manual_seed(8)) * 0.1
    head = ebood.Head(w, b)
    return ebood.Outputs(logits=head(features), features=features, labels=labels, head=head)


TRAIN = make_outputs(0, 240)
VAL = make_outputs(1, 80)
TEST = make_outputs(2, 60)


def params_for(name: str) -> dict:
    names = detectors.get(name).hyperparameter_names()
    return {k: v for k, v in SMALL_DATA_PARAMS.items() if k in names}


def make(name: str):
    return detectors.create(name, **params_for(name))


@pytest.fixture(scope="module")
def fitted():
    return {name: make(name).fit(TRAIN) for name in NAMES}


def without(outputs: ebood.Outputs, field: str) -> ebood.Outputs:
    kept = {f: getattr(outputs, f) for f in ("logits", "features", "labels", "head") if f != field}
    return ebood.Outputs(**kept)


# ----- fit / score / calibrate / predict ---------------------------------------------------------


def test_registry_has_the_issue_detectors():
    expected = {"msp", "max_logit", "energy", "entropy", "gen", "kl_matching", "temperature_scaling", "react", "ash", "scale", "dice"}
    assert expected <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_self_and_scores_are_one_finite_float_per_sample(name):
    det = make(name)
    assert det.fit(TRAIN) is det
    s = det.score(TEST)
    assert isinstance(s, torch.Tensor) and s.shape == (len(TEST),)
    assert s.dtype == torch.float32  # float32 outputs give float32 scores (CONVENTIONS.md)
    assert torch.isfinite(s).all()
    assert float(s.std()) > 0  # the data is not degenerate: scores must vary


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tpr", [0.9, 0.95])
def test_calibrate_and_predict(name, tpr, fitted):
    det = fitted[name]
    assert det.calibrate(VAL, tpr=tpr) is det
    s = det.score(VAL).double().numpy()
    n = s.size
    k = math.ceil(round(tpr * n, 9))  # the smallest threshold keeping >= tpr of ID is the k-th smallest
    assert det.threshold_ == np.sort(s)[k - 1]
    assert det.threshold_ == np.quantile(s, tpr, method="inverted_cdf")
    assert np.mean(s <= det.threshold_) >= tpr
    pred = det.predict(VAL)
    assert pred.dtype == torch.bool and pred.shape == (n,)
    assert np.array_equal(pred.numpy(), s > det.threshold_)
    assert pred.numpy().mean() <= 1 - tpr + 1e-12
    test_pred = det.predict(TEST)
    assert np.array_equal(test_pred.numpy(), det.score(TEST).double().numpy() > det.threshold_)


@pytest.mark.parametrize("name", NAMES)
def test_predict_needs_a_threshold(name):
    with pytest.raises(detectors.NotFittedError, match="calibrate"):
        make(name).fit(TRAIN).predict(TEST)


# ----- save / load -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_save_load_gives_identical_scores_and_threshold(name, tmp_path, fitted):
    det = fitted[name].calibrate(VAL, tpr=0.95)
    path = det.save(tmp_path / f"{name}.safetensors")
    loaded = ebood.load(path)
    assert type(loaded) is type(det) and loaded.get_params() == det.get_params()
    assert loaded.threshold_ == det.threshold_
    assert torch.equal(loaded.score(TEST), det.score(TEST))
    assert torch.equal(loaded.predict(TEST), det.predict(TEST))
    uncalibrated = ebood.load(make(name).fit(TRAIN).save(tmp_path / "plain.safetensors"))
    assert uncalibrated.threshold_ is None


def saved(name, tmp_path, fitted):
    path = fitted[name].save(tmp_path / "det.safetensors")
    return path, path.read_bytes()


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses_truncated_and_edited_files(name, tmp_path, fitted):
    path, data = saved(name, tmp_path, fitted)
    for cut in (len(data) // 2, 8 + header_length(data) - 1, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(StateError, match="truncated|corrupt|checksum"):
            ebood.load(path)
    start = 8 + header_length(data)
    if len(data) > start:  # detectors with tensors: flip a byte of the tensor payload
        edited = bytearray(data)
        edited[start + (len(data) - start) // 2] ^= 0x5A
        path.write_bytes(bytes(edited))
        with pytest.raises(StateError, match="checksum|corrupt"):
            ebood.load(path)
    # flip one character of the JSON header (the version string keeps the JSON valid)
    at = data.index(ebood.__version__.encode(), 8)
    edited = bytearray(data)
    edited[at] = ord("9") if edited[at] != ord("9") else ord("8")
    path.write_bytes(bytes(edited))
    with pytest.raises(StateError, match="checksum"):
        ebood.load(path)
    with pytest.raises(StateError, match="no such file"):
        ebood.load(tmp_path / "missing.safetensors")
    path.write_bytes(b"definitely not a detector file")
    with pytest.raises(StateError):
        ebood.load(path)


@pytest.mark.parametrize("name", NAMES)
def test_load_refuses_another_format_version(name, tmp_path, fitted):
    from ebood.state import _digest

    path, data = saved(name, tmp_path, fitted)
    tensors = st_load(data)
    doc = json.loads(json.loads(data[8 : 8 + header_length(data)])["__metadata__"]["ebood"])
    doc.pop("sha256")
    doc["format_version"] = 999
    doc["sha256"] = _digest(doc, tensors)  # a consistent file, only from another version
    path.write_bytes(st_save(tensors, metadata={"ebood": json.dumps(doc)}))
    with pytest.raises(StateError, match="format version 999"):
        ebood.load(path)


def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
    if t.ndim == 0:
        return t.reshape(1).repeat(2)
    return torch.cat([t, t.narrow(dim, 0, 1)], dim=dim)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_tensor_shapes_give_a_clear_error(name, tmp_path, fitted):
    path, _ = saved(name, tmp_path, fitted)
    tensors, header = load_state(path)
    if not tensors:
        pytest.skip(f"{name} keeps no tensors")
    for key in tensors:
        for dim in sorted({0, tensors[key].ndim - 1}):
            edited = dict(tensors, **{key: grown(tensors[key], max(dim, 0))})
            bad = save_state(tmp_path / "bad.safetensors", edited, header)  # a valid file, inconsistent state
            # either load refuses it, or scoring does, with a ValueError naming the mismatch (not a torch crash)
            with pytest.raises(ValueError, match="shape|dimension|must be|expects|classes|inconsistent"):
                ebood.load(bad).score(TEST)


# ----- errors ------------------------------------------------------------------------------------


def test_unknown_detector_lists_the_known_ones():
    with pytest.raises(KeyError) as info:
        detectors.create("enrgy")
    message = str(info.value)
    assert "'energy'" in message.split("Known")[0]  # a close match is suggested
    for name in detectors.available():
        assert name in message
    with pytest.raises(KeyError, match="unknown detector"):
        detectors.get("no_such_detector")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter_lists_the_known_ones(name):
    with pytest.raises(TypeError) as info:
        detectors.create(name, bogus=1)
    message = str(info.value)
    assert "'bogus'" in message
    for p in detectors.get(name).hyperparameter_names():
        assert p in message


@pytest.mark.parametrize("name", NAMES)
def test_fit_on_no_samples_is_an_error(name):
    with pytest.raises(ValueError, match="no data|empty"):
        make(name).fit(TRAIN.select(slice(0, 0)))
    with pytest.raises(ValueError, match="no data"):
        make(name).fit(iter([]))


@pytest.mark.parametrize("name", NAMES)
def test_missing_field_is_named(name, fitted):
    cls = detectors.get(name)
    for field in cls.requires:
        with pytest.raises(MissingFieldError, match=f"Outputs.{field}"):
            fitted[name].score(without(TEST, field))
    for field in set(cls.requires + cls.fit_requires):
        with pytest.raises(MissingFieldError, match=f"Outputs.{field}"):
            make(name).fit(without(TRAIN, field))
    if cls.requires in (("logits",), ("features",)):  # one input kind: the bare tensor is that input
        bare = TEST.logits if cls.requires == ("logits",) else TEST.feature()
        wrapped = ebood.Outputs(**{cls.requires[0]: bare})
        torch.testing.assert_close(fitted[name].score(bare), fitted[name].score(wrapped))
    else:
        with pytest.raises(TypeError, match="ebood.Outputs"):
            fitted[name].score(TEST.logits)


# ----- streaming fit and merge -------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMING)
def test_partial_fit_over_batches_equals_fit(name):
    full = make(name).fit(TRAIN).score(TEST)
    det = make(name)
    for batch in TRAIN.batches(37):
        assert det.partial_fit(batch) is det
    torch.testing.assert_close(det.score(TEST), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(make(name).fit(TRAIN.batches(50)).score(TEST), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", STREAMING)
def test_merge_equals_fit(name):
    full = make(name).fit(TRAIN).score(TEST)
    parts = [TRAIN.select(slice(0, 70)), TRAIN.select(slice(70, 150)), TRAIN.select(slice(150, None))]
    merged = make(name).fit(parts[0])
    for part in parts[1:]:
        assert merged.merge(make(name).fit(part)) is merged
    torch.testing.assert_close(merged.score(TEST), full, rtol=1e-5, atol=1e-6)
    fresh = make(name).merge(make(name).fit(TRAIN))  # merging into an unfitted detector
    torch.testing.assert_close(fresh.score(TEST), full, rtol=1e-5, atol=1e-6)
    other = next(n for n in STREAMING + NAMES if n != name)
    with pytest.raises(ValueError, match="same kind"):
        make(name).fit(TRAIN).merge(make(other))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in STREAMING])
def test_non_streaming_detectors_refuse_partial_fit_and_merge(name):
    with pytest.raises(TypeError, match="batch by batch"):
        make(name).partial_fit(TRAIN)
    with pytest.raises(TypeError, match="merge"):
        make(name).merge(make(name))


# ----- CLI round trip ----------------------------------------------------------------------------

load_commands()
RUNNER = CliRunner()


def write_outputs(path, outputs: ebood.Outputs):
    np.savez(
        path,
        logits=outputs.logits.numpy(),
        features=outputs.features.numpy(),
        labels=outputs.labels.numpy(),
        head_weight=outputs.head.weight.numpy(),
        head_bias=outputs.head.bias.numpy(),
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return {k: write_outputs(d / f"{k}.npz", o) for k, o in (("train", TRAIN), ("val", VAL), ("test", TEST))}


@pytest.mark.parametrize("name", NAMES)
def test_cli_fit_and_score_match_python(name, files, tmp_path):
    params = [a for k, v in params_for(name).items() for a in ("--param", f"{k}={json.dumps(v)}")]
    det_file = tmp_path / "det.safetensors"
    res = RUNNER.invoke(app, ["fit", name, str(files["train"]), *params, "-o", str(det_file), "--calibrate", str(files["val"]), "--tpr", "0.9"])
    assert res.exit_code == 0, res.output
    scores_file = tmp_path / "scores.npz"
    res = RUNNER.invoke(app, ["score", "--detector", str(det_file), str(files["test"]), "-o", str(scores_file), "--predict"])
    assert res.exit_code == 0, res.output
    got = np.load(scores_file)
    python = make(name).fit(ebood.io.read_outputs(files["train"])).calibrate(ebood.io.read_outputs(files["val"]), tpr=0.9)
    expected = python.score(ebood.io.read_outputs(files["test"]))
    assert np.array_equal(got[name], expected.numpy())
    assert np.array_equal(got["is_ood"].astype(bool), python.predict(TEST).numpy())
    assert ebood.load(det_file).threshold_ == python.threshold_


def test_cli_detectors_lists_every_detector():
    res = RUNNER.invoke(app, ["detectors", "--json"])
    assert res.exit_code == 0, res.output
    infos = {d["name"]: d for d in json.loads(res.output)}
    assert set(infos) == set(detectors.available())
    for name, info in infos.items():
        cls = detectors.get(name)
        assert info["score"] == list(cls.requires)
        assert list(info["hyperparameters"]) == cls.hyperparameter_names()
        assert info["paper"] == cls.paper
    assert infos["ash"]["hyperparameters"] == {"variant": "s", "percentile": 90}
    table = RUNNER.invoke(app, ["detectors"], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    for name in detectors.available():
        assert f" {name} " in table.output


def test_cli_fit_errors_are_one_line(files, tmp_path):
    out = str(tmp_path / "x.safetensors")
    cases = [
        (["fit", "enrgy", str(files["train"]), "-o", out], "unknown detector 'enrgy'"),
        (["fit", "ash", str(files["train"]), "-p", "bogus=1", "-o", out], "its hyperparameters are: variant, percentile"),
        (["fit", "ash", str(files["train"]), "-p", "variant", "-o", out], "expected KEY=VALUE"),
        (["fit", "ash", str(files["train"]), "-p", "variant=z", "-o", out], "unknown variant 'z'"),
        (["fit", "react", str(tmp_path / "missing.npz"), "-o", out], "no such file"),
        (["fit", "react", str(files["train"]), "--head", str(files["train"]), "-o", out], "already holds head_weight"),
    ]
    for args, message in cases:
        res = RUNNER.invoke(app, args)
        assert res.exit_code != 0 and isinstance(res.exception, SystemExit), args  # handled, not a crash
        assert res.output.count("\n") == 1 and res.output.startswith("ebood: error:"), res.output
        assert message in res.output
        assert "Traceback" not in res.output


def test_cli_fit_reads_parquet_with_a_separate_head(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    train = tmp_path / "train.parquet"
    pq.write_table(pa.table({"features": pa.array(list(TRAIN.features.numpy())), "labels": TRAIN.labels.numpy()}), train)
    head = tmp_path / "head.npz"
    np.savez(head, head_weight=TRAIN.head.weight.numpy(), head_bias=TRAIN.head.bias.numpy())
    det_file = tmp_path / "dice.safetensors"
    res = RUNNER.invoke(app, ["fit", "dice", str(train), "-o", str(det_file)])
    assert res.exit_code != 0 and "--head" in res.output
    res = RUNNER.invoke(app, ["fit", "dice", str(train), "--head", str(head), "-p", "percentile=80", "-o", str(det_file)])
    assert res.exit_code == 0, res.output
    expected = detectors.create("dice", percentile=80).fit(TRAIN).score(TEST)
    assert torch.equal(ebood.load(det_file).score(TEST), expected)


def test_cli_fit_prints_warnings_as_one_line(tmp_path):
    z = TRAIN.logits.numpy().copy()
    z[:, 2] -= 100.0  # class 2 is never predicted: kl_matching warns
    np.savez(tmp_path / "z.npz", logits=z)
    res = RUNNER.invoke(app, ["fit", "kl_matching", str(tmp_path / "z.npz"), "-o", str(tmp_path / "k.safetensors")])
    assert res.exit_code == 0, res.output
    warning_lines = [line for line in res.output.splitlines() if line.startswith("ebood: warning")]
    assert "RuntimeWarning" not in res.output
    assert warning_lines == ["ebood: warning: kl_matching: no training sample is predicted as class(es) [2]; they get no template"]


# ----- a bare tensor for detectors that need one input kind; a short repr(Outputs) ---------------
def test_score_accepts_bare_logits_and_matches_the_formula():
    import numpy as np
    from scipy.special import logsumexp

    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    got = create("energy").score(logits)
    expected = -logsumexp(logits.double().numpy(), axis=1)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(create("energy").score(logits.numpy()), got)  # a numpy array too


def test_fit_and_score_accept_bare_features_for_feature_only_detectors():
    import numpy as np

    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(80, 5, generator=g), torch.randn(20, 5, generator=g)
    knn = create("knn", k=3).fit(train)
    # brute force: distance to the 3rd nearest L2-normalised training feature, negated similarity order
    a = torch.nn.functional.normalize(test.double(), dim=1).numpy()
    b = torch.nn.functional.normalize(train.double(), dim=1).numpy()
    kth = np.sort(np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2), axis=1)[:, 2]
    np.testing.assert_allclose(knn.score(test).double().numpy(), kth, rtol=1e-4, atol=1e-5)
    det = create("knn", k=3).fit(ebood.Outputs(features=train))
    assert torch.allclose(det.score(test), knn.score(ebood.Outputs(features=test)))


def test_bare_tensor_refused_where_the_detector_needs_several_inputs():
    feats = torch.randn(30, 4)
    with pytest.raises(TypeError, match=r"needs Outputs.features and Outputs.head to fit.*ebood.Outputs\(features=..., head=...\)"):
        create("vim").fit(feats)
    with pytest.raises(TypeError, match=r"needs Outputs.features and Outputs.labels to fit"):
        create("mahalanobis").fit(feats)


def test_outputs_repr_shows_shapes_and_dtypes_only():
    n = 360
    out = ebood.Outputs(logits=torch.randn(n, 10), features={"conv": torch.randn(n, 4), "fc": torch.randn(n, 64)},
                        labels=torch.arange(n) % 10, head=ebood.Head(torch.randn(10, 64)))
    text = repr(out)
    assert text == ("Outputs(n=360, logits=float32[360, 10], features={'conv': float32[360, 4], 'fc': float32[360, 64]}, "
                    "labels=int64[360], head=Head(weight=float32[10, 64], bias=float32[10]))")
    assert repr(ebood.Outputs(logits=torch.zeros(2, 3, dtype=torch.float64))) == "Outputs(n=2, logits=float64[2, 3])"
