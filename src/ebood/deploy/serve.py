"""A wrapped detector behind HTTP, on Ray Serve (``pip install 'ebood[serve]'``).

:func:`build_app` makes the Serve application: one deployment whose replicas each hold the wrapped
module (built from a model and a saved detector, or loaded from an exported ``.pt2`` / ``.pt`` /
``.onnx`` file) and answer the routes of :class:`ebood.deploy.service.ScoringService`
(``POST /score``, ``GET /healthz``, ``GET /metrics``). Concurrent ``/score`` requests are merged by
``serve.batch`` (up to ``max_batch_size`` requests, waiting at most ``batch_wait_ms``) into one
forward pass, and each gets its own rows back.

:func:`start` starts Ray (a local instance, or joins ``address``) and Serve on ``host:port`` and
deploys the application; :func:`stop` undoes what it started. Ray's and Serve's own logs are kept
at warnings and above, without access logs. Paths in ``source`` must exist where the replicas run
(on every node of a cluster).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response as HTTPResponse
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"ebood serve needs Ray Serve: pip install 'ebood[serve]' ({exc})") from None

from .service import ScoringService

__all__ = ["build_app", "start", "stop", "DetectorDeployment", "load_source", "APP_NAME"]

APP_NAME = "ebood"
Source = dict[str, Any]


def load_source(source: Source) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]], str, float, tuple[int, ...]]:
    """``(run, detector name, threshold, input shape)`` from a source: ``{"exported": path}`` or the
    arguments of :func:`ebood.deploy.wrap_files` (``model``, ``detector``, ``checkpoint``, ...)."""
    if "exported" in source:
        from .export import load_exported

        loaded = load_exported(source["exported"])
        return loaded, loaded.detector_name, loaded.threshold, loaded.input_shape
    from .module import wrap_files

    args = dict(source)
    model_kwargs = args.pop("model_kwargs", {}) or {}
    wrapped, example = wrap_files(**args, **model_kwargs)
    return wrapped, wrapped.detector_name, float(wrapped.threshold), tuple(example.shape[1:])


async def _read_body(request: Request, limit: int) -> tuple[bytes | None, bool]:
    """The body, or ``(None, True)`` as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return None, True
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None, True
        chunks.append(chunk)
    return b"".join(chunks), False


@serve.deployment(name="detector", max_ongoing_requests=256)
class DetectorDeployment:
    """One replica: the wrapped module, the HTTP service and its metrics."""

    def __init__(self, source: Source, max_batch_size: int = 32, batch_wait_ms: float = 5.0, max_body_bytes: int = 16 * 2**20, max_rows: int = 4096) -> None:
        self._run, name, threshold, shape = load_source(source)
        self._batched.set_max_batch_size(int(max_batch_size))
        self._batched.set_batch_wait_timeout_s(float(batch_wait_ms) / 1000.0)
        self.service = ScoringService(self._batched, detector=name, threshold=threshold, input_shape=shape,
                                      max_body_bytes=max_body_bytes, max_rows=max_rows)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, batches: list[np.ndarray]) -> list[dict[str, list[Any]]]:
        sizes = [len(b) for b in batches]
        with torch.inference_mode():
            out = self._run(torch.from_numpy(np.concatenate(batches)))
        score = out["score"].to(torch.float64).tolist()
        is_ood = out["is_ood"].to(torch.bool).tolist()
        prediction = out["logits"].argmax(dim=1).tolist()
        results, start = [], 0
        for n in sizes:
            results.append({"score": score[start : start + n], "is_ood": is_ood[start : start + n], "prediction": prediction[start : start + n]})
            start += n
        return results

    async def __call__(self, request: Request) -> HTTPResponse:
        body, too_large = (None, False)
        if request.method == "POST":
            body, too_large = await _read_body(request, self.service.max_body_bytes)
        response = await self.service.handle(request.method, request.url.path, request.headers.get("content-type", ""), body, too_large)
        return HTTPResponse(response.body, status_code=response.status, media_type=response.content_type)


def _absolute(source: Source) -> Source:
    out = dict(source)
    for key in ("exported", "detector", "checkpoint"):
        if out.get(key) is not None:
            out[key] = str(Path(out[key]).resolve())
    if out.get("model") and Path(str(out["model"])).is_file():  # a TorchScript model file
        out["model"] = str(Path(out["model"]).resolve())
    return out


def build_app(source: Source, *, replicas: int = 1, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
              max_body_bytes: int = 16 * 2**20, max_rows: int = 4096) -> Any:
    """The Serve application (``serve.run`` it, or use :func:`start`). The source is first loaded
    here, so that a bad model or detector fails now with its own message, not in a replica."""
    load_source(source)
    return DetectorDeployment.options(num_replicas=int(replicas)).bind(
        _absolute(source), max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_body_bytes=max_body_bytes, max_rows=max_rows
    )


_STARTED_RAY: list[bool] = []


def _init_ray(address: str | None, level: int, quiet: bool, num_cpus: int | None, attempts: int = 3) -> None:
    import ray

    kwargs: dict[str, Any] = {"num_cpus": num_cpus} if address is None and num_cpus is not None else {}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=not quiet, logging_level=level, configure_logging=True, **kwargs)
            return
        except Exception:
            # a busy machine can miss Ray's short start-up window for its node agents: try again
            ray.shutdown()
            if address is not None or attempt == attempts:
                raise


def start(source: Source, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, quiet: bool = True,
          num_cpus: int | None = None, **options: Any) -> str:
    """Start Ray (a local instance with ``num_cpus``, or join the cluster at ``address``) unless it
    is running, and Serve on ``host:port``; deploy the application and return its URL.
    ``options`` go to :func:`build_app`."""
    import ray

    app = build_app(source, **options)
    level = logging.ERROR if quiet else logging.INFO
    if not ray.is_initialized():
        _init_ray(address, level, quiet, num_cpus)
        _STARTED_RAY.append(True)
    if quiet:
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging_config = {"log_level": "WARNING" if quiet else "INFO", "enable_access_log": not quiet}
    serve.start(http_options={"host": host, "port": int(port)}, logging_config=logging_config)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=logging_config)
    return f"http://{host}:{int(port)}"


def stop() -> None:
    """Shut Serve down, and Ray too when :func:`start` started it."""
    import ray

    if ray.is_initialized():
        serve.shutdown()
    if _STARTED_RAY:
        _STARTED_RAY.clear()
        ray.shutdown()
