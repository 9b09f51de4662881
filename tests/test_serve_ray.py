"""``ebood.deploy.serve`` over HTTP on Ray Serve: loopback only, a bounded number of requests with
timeouts, Serve and Ray shut down at the end. Bad requests get a 4xx and the replica keeps answering."""

import io
import json
import socket
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from serve_helpers import SHAPE, save_served_model

import ebood

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, path, body=None, kind="application/json"):
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(req, timeout=60) as f:
            return f.status, f.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ebood.deploy import serve as served
    folder = tmp_path_factory.mktemp("served")
    net, det = save_served_model(folder)
    source = {"model": "digits_cnn", "checkpoint": folder / "ck.pt", "detector": folder / "det.safetensors"}
    try:
        for attempt in range(2):  # Serve's proxy can miss its health check on a loaded machine
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    url = served.start(source, host="127.0.0.1", port=free_port(), num_cpus=2, max_batch_size=8, batch_wait_ms=20,
                                       max_body_bytes=100_000, max_rows=32)
                break
            except ray.exceptions.RayError:
                served.stop()
                if attempt == 1:
                    raise
        yield url, net, det
    finally:
        served.stop()  # Serve, and the Ray instance that start() started
        assert not ray.is_initialized()


def reference(net, det, x):
    outs = ebood.extract(net, torch.as_tensor(x), progress=False)
    return det.score(outs), det.predict(outs), outs.logits.argmax(1)


def test_health_and_scores_match_the_detector(server):
    url, net, det = server
    status, body = http(url, "/healthz")
    assert status == 200 and json.loads(body)["detector"] == "knn"
    x = np.random.default_rng(2).random((3, *SHAPE), dtype=np.float32)
    score, is_ood, pred = reference(net, det, x)
    for payload, kind in ((npy(x), "application/x-npy"), (json.dumps({"inputs": x.tolist()}).encode(), "application/json")):
        status, body = http(url, "/score", payload, kind)
        got = json.loads(body)
        assert status == 200, got
        np.testing.assert_allclose(got["score"], score.numpy(), rtol=1e-5, atol=1e-6)
        assert got["is_ood"] == is_ood.tolist() and got["prediction"] == pred.tolist()


def test_bad_requests_get_4xx_and_the_replica_stays_up(server):
    url, *_ = server
    bad = [
        (b"{oops", "application/json", 400),
        (json.dumps({"inputs": [[1.0, 2.0]]}).encode(), "application/json", 422),
        (npy(np.full((1, *SHAPE), np.nan, np.float32)), "application/x-npy", 422),
        (npy(np.zeros((2, *SHAPE), np.complex64)), "application/x-npy", 422),
        (npy(np.zeros((33, *SHAPE), np.float32)), "application/x-npy", 413),
        (b"0" * 100_001, "application/json", 413),
    ]
    for payload, kind, want in bad:
        status, body = http(url, "/score", payload, kind)
        assert status == want, body
        assert json.loads(body)["error"]
    assert http(url, "/score", npy(np.zeros((1, *SHAPE), np.float32)), "application/x-npy")[0] == 200


def test_concurrent_requests_each_get_their_own_rows_and_metrics_count_them(server):
    url, net, det = server
    _, before = http(url, "/metrics")
    rows = np.random.default_rng(4).random((12, *SHAPE), dtype=np.float32)
    expected, flagged, _ = reference(net, det, rows)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: http(url, "/score", npy(rows[i : i + 1]), "application/x-npy"), range(len(rows))))
    assert all(s == 200 for s, _ in answers)
    np.testing.assert_allclose([json.loads(b)["score"][0] for _, b in answers], expected.numpy(), rtol=1e-5, atol=1e-6)

    def samples(text):
        line = next(l for l in text.decode().splitlines() if l.startswith("ebood_samples_total"))
        return int(line.rsplit(" ", 1)[1])

    status, after = http(url, "/metrics")
    assert status == 200 and samples(after) - samples(before) == len(rows)
    assert "ebood_ood_rate_recent" in after.decode()
