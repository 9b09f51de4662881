"""The scoring service: routes, validation and metrics, without a server (test_serve_ray.py runs the
same service over HTTP on Ray Serve)."""

import asyncio
import io
import json

import numpy as np
import pytest
import torch
from serve_helpers import SHAPE, save_served_model

import ebood
from ebood.deploy import wrap
from ebood.deploy.service import RECENT, ScoringService, parse_inputs



def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A digits CNN and a calibrated KNN detector, saved to files as a user would."""
    folder = tmp_path_factory.mktemp("served")
    net, det = save_served_model(folder)
    return net, det, folder


@pytest.fixture(scope="module")
def service(fitted):
    net, det, _ = fitted
    wrapped = wrap(net, det)
    calls = []

    async def score_batch(batch):
        calls.append(batch.shape)
        with torch.inference_mode():
            out = wrapped(torch.from_numpy(batch))
        return {"score": out["score"].double().tolist(), "is_ood": out["is_ood"].tolist(), "prediction": out["logits"].argmax(1).tolist()}

    svc = ScoringService(score_batch, detector=det.name, threshold=det.threshold_, input_shape=SHAPE, max_body_bytes=50_000, max_rows=64)
    svc.calls = calls
    return svc


def call(svc, method, path, body=None, content_type="application/json"):
    response = asyncio.run(svc.handle(method, path, content_type, body))
    payload = json.loads(response.body) if response.content_type == "application/json" else response.body.decode()
    return response.status, payload


def reference(fitted, x):
    net, det, _ = fitted
    outs = ebood.extract(net, torch.as_tensor(x), progress=False)
    return det.score(outs), det.predict(outs), outs.logits.argmax(1)


def test_score_json_and_npy_match_the_detector(service, fitted):
    x = np.random.default_rng(0).random((5, *SHAPE), dtype=np.float32)
    score, is_ood, pred = reference(fitted, x)
    for body, kind in ((json.dumps({"inputs": x.tolist()}).encode(), "application/json"), (npy(x), "application/x-npy")):
        status, got = call(service, "POST", "/score", body, kind)
        assert status == 200, got
        assert set(got) == {"score", "is_ood", "prediction"}
        np.testing.assert_allclose(got["score"], score.numpy(), rtol=1e-5, atol=1e-6)
        assert got["is_ood"] == is_ood.tolist() and got["prediction"] == pred.tolist()


def test_one_input_without_batch_axis_and_integer_dtype(service, fitted):
    x = np.random.default_rng(1).integers(0, 2, size=SHAPE)
    status, got = call(service, "POST", "/score", npy(x), "application/octet-stream")
    assert status == 200, got
    score, _, _ = reference(fitted, x[None].astype(np.float32))
    np.testing.assert_allclose(got["score"], score.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "body, kind, status, fragment",
    [
        (b"{not json", "application/json", 400, "malformed JSON"),
        (b"[1, 2]", "application/json", 400, '{"inputs"'),
        (json.dumps({"inputs": [[1, 2], [3]]}).encode(), "application/json", 422, "rectangular"),
        (json.dumps({"inputs": [["a"] * 8] * 8}).encode(), "application/json", 422, "dtype"),
        (json.dumps({"inputs": np.zeros((2, 3, 8, 8)).tolist()}).encode(), "application/json", 422, "expected (N, 1, 8, 8)"),
        (npy(np.zeros((0, *SHAPE), np.float32)), "application/x-npy", 422, "no sample"),
        (npy(np.zeros((65, *SHAPE), np.float32)), "application/x-npy", 413, "at most 64"),
        (b"\x93NUMPY garbage", "application/x-npy", 400, "malformed .npy"),
        (npy(np.array([None] * 64, dtype=object).reshape(SHAPE)), "application/x-npy", 422, "objects"),
        (npy(np.zeros((2, *SHAPE), np.complex64)), "application/x-npy", 422, "dtype"),
        (b"x" * 50_001, "application/json", 413, "over 50000 bytes"),
        (b"a,b", "text/csv", 415, "content type"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(service, body, kind, status, fragment):
    got_status, got = call(service, "POST", "/score", body, kind)
    assert got_status == status, got
    assert fragment in got["error"], got


def test_nan_and_inf_are_refused_naming_the_row(service):
    x = np.zeros((4, *SHAPE), np.float32)
    x[2, 0, 3, 3] = np.nan
    x[3, 0, 0, 0] = np.inf
    status, got = call(service, "POST", "/score", npy(x), "application/x-npy")
    assert status == 422 and "2 sample(s), first at index 2" in got["error"]


def test_routes_and_methods(service):
    assert call(service, "GET", "/healthz")[1]["status"] == "ok"
    assert call(service, "GET", "/nowhere")[0] == 404
    assert call(service, "GET", "/score")[0] == 405
    assert call(service, "POST", "/healthz")[0] == 405


def test_metrics_count_requests_and_the_ood_rate(fitted):
    flags = iter([[True, False, False, False], [True, True]])

    async def score_batch(batch):
        f = next(flags)
        return {"score": [0.0] * len(f), "is_ood": f, "prediction": [0] * len(f)}

    svc = ScoringService(score_batch, detector="knn", threshold=0.5, input_shape=(2,))
    call(svc, "POST", "/score", json.dumps({"inputs": [[0, 0]] * 4}).encode())
    call(svc, "POST", "/score", json.dumps({"inputs": [[0, 0]] * 2}).encode())
    call(svc, "POST", "/score", b"{")
    _, text = call(svc, "GET", "/metrics")
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines['ebood_requests_total{detector="knn",status="200"}'] == "2"
    assert lines['ebood_requests_total{detector="knn",status="400"}'] == "1"
    assert lines['ebood_samples_total{detector="knn"}'] == "6"
    assert lines['ebood_ood_total{detector="knn"}'] == "3"
    assert float(lines['ebood_ood_rate{detector="knn"}']) == pytest.approx(3 / 6)
    assert float(lines['ebood_ood_rate_recent{detector="knn"}']) == pytest.approx(3 / 6)
    assert "# TYPE ebood_requests_total counter" in text


def test_recent_rate_is_a_sliding_window():
    from ebood.deploy.service import Metrics

    m = Metrics()
    m.count_decisions([True] * RECENT)
    m.count_decisions([False] * (RECENT // 2))
    text = m.render("x")
    assert f'ebood_ood_rate_recent{{detector="x"}} {0.5:.6g}' in text
    assert f'ebood_ood_rate{{detector="x"}} {RECENT / (RECENT * 1.5):.6g}' in text


def test_a_failing_model_answers_500_and_the_service_keeps_working(service):
    original = service.score_batch

    async def broken(batch):
        raise RuntimeError("boom")

    service.score_batch = broken
    try:
        status, got = call(service, "POST", "/score", npy(np.zeros((1, *SHAPE), np.float32)), "application/x-npy")
    finally:
        service.score_batch = original
    assert status == 500 and "boom" in got["error"]
    assert call(service, "POST", "/score", npy(np.zeros((1, *SHAPE), np.float32)), "application/x-npy")[0] == 200


def test_parse_inputs_casts_to_float32():
    x = parse_inputs(npy(np.ones((2, 3), np.float64)), "application/x-npy", (3,), 10)
    assert x.dtype == np.float32 and x.shape == (2, 3)


def test_replicas_load_an_exported_file_like_the_wrapped_module(fitted, tmp_path):
    pytest.importorskip("ray.serve")
    from ebood.deploy import export
    from ebood.deploy.serve import load_source

    net, det, folder = fitted
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(9))
    direct, name, threshold, shape = load_source({"model": "digits_cnn", "checkpoint": folder / "ck.pt", "detector": folder / "det.safetensors"})
    assert (name, threshold, shape) == ("knn", det.threshold_, SHAPE)
    export(direct, x[:2], tmp_path / "w.pt2")
    loaded, name2, threshold2, shape2 = load_source({"exported": tmp_path / "w.pt2"})
    assert (name2, threshold2, shape2) == (name, threshold, shape)
    with torch.no_grad():
        a, b = direct(x), loaded(x)
    torch.testing.assert_close(a["score"], b["score"])
    assert torch.equal(a["is_ood"], b["is_ood"])


@pytest.mark.parametrize("flag", ["--address", "--ray"])
def test_cli_serve_joins_the_cluster_named_by_address_or_ray(fitted, monkeypatch, flag):
    """`ebood serve --ray ADDRESS` means what `--ray ADDRESS` means in `ebood score` / `ebood fit`."""
    from cli_helpers import run

    from ebood.deploy import serve as served

    class Stop(Exception):
        pass

    seen = {}

    def start(source, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(served, "start", start)
    _, _, folder = fitted
    res = run("serve", "--model", "digits_cnn", "--checkpoint", folder / "ck.pt", "--detector", folder / "det.safetensors",
              flag, "ray://head:10001")
    assert res.exit_code != 0 and "Stop" in res.output  # start() was reached, and its failure reported
    assert seen["address"] == "ray://head:10001"
