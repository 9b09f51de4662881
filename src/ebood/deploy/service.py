"""The HTTP scoring service, independent of the server that hosts it (``serve`` runs it on Ray Serve).

Routes:

* ``POST /score``: a JSON body ``{"inputs": [...]}`` (a nested list of numbers), or NumPy ``.npy``
  bytes (``Content-Type: application/x-npy`` or ``application/octet-stream``), holding a batch
  ``(N, *input_shape)`` or one input ``input_shape``. Answer: ``{"score": [...], "is_ood": [...],
  "prediction": [...]}`` (one entry per input; ``prediction`` is the argmax of the logits).
* ``GET /healthz``: ``{"status": "ok", ...}`` with the detector, threshold and input shape.
* ``GET /metrics``: Prometheus text: requests by status, samples scored, samples flagged as OOD,
  the OOD rate overall and over the last :data:`RECENT` samples (a drift in the input shows there).

A bad request (malformed JSON or ``.npy``, wrong shape, non-numeric dtype, NaN or inf, an empty
batch, a body or batch over the limits) is answered with a 4xx status and ``{"error": message}``;
nothing a request holds can raise out of :meth:`ScoringService.handle`.
"""

from __future__ import annotations

import collections
import io
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

__all__ = ["RequestError", "ScoringService", "Metrics", "parse_inputs", "Response", "NPY_TYPES", "RECENT"]

#: content types read as NumPy .npy bytes
NPY_TYPES = ("application/x-npy", "application/octet-stream", "application/npy")
#: samples in the sliding window of the recent OOD rate
RECENT = 1000


class RequestError(ValueError):
    """A request that cannot be scored: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, payload: Any) -> "Response":
        return cls(status, json.dumps(payload, allow_nan=False).encode())

    @classmethod
    def error(cls, status: int, message: str) -> "Response":
        return cls.json(status, {"error": message})


def _json_array(body: bytes) -> np.ndarray:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError(400, 'the JSON body must be an object {"inputs": [...]}')
    try:
        array = np.asarray(doc["inputs"])
    except ValueError:
        raise RequestError(422, "inputs must be a rectangular nested list of numbers (rows of different lengths)") from None
    if array.dtype == object:
        raise RequestError(422, "inputs must be a rectangular nested list of numbers (rows of different lengths)")
    return array


def _npy_array(body: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise RequestError(422, "the .npy array holds Python objects; send numbers") from None
        raise RequestError(400, f"malformed .npy body: {exc}") from None
    except Exception as exc:  # numpy raises several types for a damaged header
        raise RequestError(400, f"malformed .npy body: {exc}") from None


def parse_inputs(body: bytes, content_type: str, input_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    """The float32 batch ``(N, *input_shape)`` a request body holds, or a :class:`RequestError`."""
    kind = content_type.split(";")[0].strip().lower()
    if kind in NPY_TYPES:
        array = _npy_array(body)
    elif kind in ("application/json", "", "text/json"):
        array = _json_array(body)
    else:
        raise RequestError(415, f"unsupported content type {kind!r}; send application/json or application/x-npy")
    if array.dtype.kind not in "fiu":
        raise RequestError(422, f"inputs must be numbers (float or int), got dtype {array.dtype}")
    if tuple(array.shape) == tuple(input_shape):
        array = array[None]
    if array.ndim != len(input_shape) + 1 or tuple(array.shape[1:]) != tuple(input_shape):
        want = ", ".join(map(str, input_shape))
        raise RequestError(422, f"inputs have shape {tuple(array.shape)}; expected (N, {want}) or one input ({want})")
    if array.shape[0] == 0:
        raise RequestError(422, "inputs hold no sample (N = 0)")
    if array.shape[0] > max_rows:
        raise RequestError(413, f"inputs hold {array.shape[0]} samples; at most {max_rows} per request")
    batch = array.astype(np.float32)
    finite = np.isfinite(batch.reshape(batch.shape[0], -1)).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise RequestError(422, f"inputs hold NaN or inf in {bad.size} sample(s), first at index {int(bad[0])}")
    return batch


@dataclass
class Metrics:
    """Counters of one service instance (one replica), rendered in Prometheus' text format."""

    requests: collections.Counter = field(default_factory=collections.Counter)
    samples: int = 0
    ood: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_request(self, status: int) -> None:
        with self.lock:
            self.requests[status] += 1

    def count_decisions(self, is_ood: list[bool]) -> None:
        with self.lock:
            self.samples += len(is_ood)
            self.ood += sum(is_ood)
            self.recent.extend(is_ood)

    def render(self, detector: str) -> str:
        with self.lock:
            label = f'detector="{detector}"'
            lines = [
                "# HELP ebood_requests_total Requests to /score, by HTTP status.",
                "# TYPE ebood_requests_total counter",
                *(f'ebood_requests_total{{{label},status="{s}"}} {n}' for s, n in sorted(self.requests.items())),
                "# HELP ebood_samples_total Samples scored.",
                "# TYPE ebood_samples_total counter",
                f"ebood_samples_total{{{label}}} {self.samples}",
                "# HELP ebood_ood_total Samples flagged as out-of-distribution (score > threshold).",
                "# TYPE ebood_ood_total counter",
                f"ebood_ood_total{{{label}}} {self.ood}",
                "# HELP ebood_ood_rate Fraction of all scored samples flagged as OOD.",
                "# TYPE ebood_ood_rate gauge",
                f"ebood_ood_rate{{{label}}} {self.ood / self.samples if self.samples else 0.0:.6g}",
                f"# HELP ebood_ood_rate_recent Fraction flagged as OOD among the last {RECENT} samples.",
                "# TYPE ebood_ood_rate_recent gauge",
                f"ebood_ood_rate_recent{{{label}}} {sum(self.recent) / len(self.recent) if self.recent else 0.0:.6g}",
            ]
        return "\n".join(lines) + "\n"


#: the scoring call: a float32 batch -> {"score", "is_ood", "prediction"} lists
ScoreFn = Callable[[np.ndarray], Awaitable[dict[str, list[Any]]]]


class ScoringService:
    """Routes, validation and metrics around an async scoring function (``score_batch``)."""

    def __init__(self, score_batch: ScoreFn, *, detector: str, threshold: float, input_shape: tuple[int, ...],
                 max_body_bytes: int = 16 * 2**20, max_rows: int = 4096) -> None:
        self.score_batch = score_batch
        self.detector = detector
        self.threshold = float(threshold)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.max_body_bytes = int(max_body_bytes)
        self.max_rows = int(max_rows)
        self.metrics = Metrics()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "detector": self.detector, "threshold": self.threshold, "input_shape": list(self.input_shape)}

    async def handle(self, method: str, path: str, content_type: str, body: bytes | None, body_too_large: bool = False) -> Response:
        """The response to one request (never raises)."""
        path = "/" + path.strip("/")
        try:
            if path == "/healthz":
                return Response.json(200, self.health()) if method in ("GET", "HEAD") else Response.error(405, "use GET /healthz")
            if path == "/metrics":
                if method not in ("GET", "HEAD"):
                    return Response.error(405, "use GET /metrics")
                return Response(200, self.metrics.render(self.detector).encode(), "text/plain; version=0.0.4")
            if path != "/score":
                return Response.error(404, f"no route {path}; use POST /score, GET /healthz or GET /metrics")
            if method != "POST":
                response = Response.error(405, "use POST /score")
            else:
                response = await self._score(content_type, body, body_too_large)
        except Exception as exc:  # a bug, not the request's fault: answer 500, keep the replica up
            response = Response.error(500, f"internal error: {type(exc).__name__}: {exc}")
        self.metrics.count_request(response.status)
        return response

    async def _score(self, content_type: str, body: bytes | None, body_too_large: bool) -> Response:
        if body_too_large or (body is not None and len(body) > self.max_body_bytes):
            return Response.error(413, f"request body over {self.max_body_bytes} bytes")
        try:
            batch = parse_inputs(body or b"", content_type, self.input_shape, self.max_rows)
        except RequestError as exc:
            return Response.error(exc.status, str(exc))
        result = await self.score_batch(batch)
        scores = result["score"]
        if not all(math.isfinite(s) for s in scores):
            bad = next(i for i, s in enumerate(scores) if not math.isfinite(s))
            return Response.error(422, f"the detector's score is not finite for sample {bad} (its features overflow float32)")
        self.metrics.count_decisions([bool(v) for v in result["is_ood"]])
        return Response.json(200, {"score": scores, "is_ood": result["is_ood"], "prediction": result["prediction"]})
