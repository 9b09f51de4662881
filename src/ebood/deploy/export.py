"""Export a wrapped module to a file (TorchScript, ``torch.export``, ONNX) and load it back.

The format follows the file's suffix:

* ``.pt2``: ``torch.export`` (an ``ExportedProgram``, ``torch.export.save``), batch size dynamic;
* ``.pt`` / ``.ts``: TorchScript (``torch.jit.trace``; the batch size stays free);
* ``.onnx``: ONNX through ``torch.onnx.export(dynamo=True)`` (needs ``onnx`` and ``onnxscript``;
  ``pip install 'ebood[export]'``), inputs named ``inputs``, outputs ``logits``, ``score``, ``is_ood``.

Every file carries a JSON description (detector, threshold, input shape and dtype, number of
classes, ebood version): an extra file ``ebood.json`` for the PyTorch formats, the metadata entry
``ebood`` for ONNX. :func:`load_exported` reads any of them into an :class:`ExportedDetector` whose
call returns the same dict as the wrapped module. Files are written atomically (a temporary file in
the same folder, then a rename: ``ebood.io.atomic_path``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._version import __version__
from ..io import atomic_path, check_writable
from .module import WrappedDetector

__all__ = ["export", "load_exported", "ExportedDetector", "ExportError", "FORMATS", "format_of"]

METADATA_NAME = "ebood.json"
METADATA_FORMAT = "ebood.wrapped"
OUTPUT_NAMES = ("logits", "score", "is_ood")

#: file suffix -> export format
FORMATS = {".pt2": "export", ".pt": "torchscript", ".ts": "torchscript", ".onnx": "onnx"}


class ExportError(ValueError):
    """A file that cannot be written or read as an exported wrapped module; the message says why."""


def format_of(path: str | Path) -> str:
    """The export format that ``path``'s suffix names (an ExportError for another suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ExportError(f"{path}: unknown export format {suffix or '(no suffix)'!r}; use .pt2 (torch.export), .pt (TorchScript) or .onnx")
    return FORMATS[suffix]


def _example_tensor(example: Any) -> torch.Tensor:
    x = torch.as_tensor(example)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ExportError(f"example must be a batch of at least one input (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    # torch.export specialises a dimension of size 1; two rows keep the batch size free
    return x if x.shape[0] >= 2 else torch.cat([x, x])


def _metadata(wrapped: WrappedDetector, x: torch.Tensor, fmt: str, num_classes: int) -> dict[str, Any]:
    return {
        "format": METADATA_FORMAT,
        "export_format": fmt,
        "ebood_version": __version__,
        "torch_version": torch.__version__,
        "detector": wrapped.detector_name,
        "threshold": float(wrapped.threshold),
        "input_shape": list(x.shape[1:]),
        "input_dtype": str(x.dtype).removeprefix("torch."),
        "num_classes": int(num_classes),
        "outputs": list(OUTPUT_NAMES),
    }


def export(wrapped: WrappedDetector, example: Any, path: str | Path, *, format: str | None = None) -> Path:
    """Write ``wrapped`` to ``path`` in the format its suffix names (or ``format``: ``"export"``,
    ``"torchscript"``, ``"onnx"``). ``example`` is a batch of inputs of the served shape; the
    module is first run on it (:meth:`WrappedDetector.check`). The batch size stays dynamic."""
    if not isinstance(wrapped, WrappedDetector):
        raise TypeError(f"export takes the module returned by ebood.wrap, got {type(wrapped).__name__}")
    path = Path(path)
    fmt = format or format_of(path)
    if fmt not in set(FORMATS.values()):
        raise ExportError(f"unknown export format {fmt!r}; choose export, torchscript or onnx")
    x = _example_tensor(example).to(wrapped.threshold.device)
    wrapped.eval()
    wrapped.check(x)
    with torch.no_grad():
        num_classes = int(wrapped(x)["logits"].shape[1])
    meta = json.dumps(_metadata(wrapped, x, fmt, num_classes), sort_keys=True)
    check_writable(path)  # before the (slow) tracing
    converter = {"export": _convert_export, "torchscript": _convert_torchscript, "onnx": _convert_onnx}[fmt]
    save = converter(wrapped, x, meta)  # tracing errors are not file errors: outside the atomic write
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save(tmp)
    return path


def _convert_export(wrapped: WrappedDetector, x: torch.Tensor, meta: str) -> Callable[[Path], None]:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(wrapped, (x,), dynamic_shapes=({0: batch},), strict=False)
    return lambda tmp: torch.export.save(program, str(tmp), extra_files={METADATA_NAME: meta})


def _convert_torchscript(wrapped: WrappedDetector, x: torch.Tensor, meta: str) -> Callable[[Path], None]:
    with warnings.catch_warnings():
        # recent torch deprecates TorchScript in favour of torch.export; tracing still works
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, (x,), strict=False, check_trace=False)
    return lambda tmp: torch.jit.save(traced, str(tmp), _extra_files={METADATA_NAME: meta})


def _convert_onnx(wrapped: WrappedDetector, x: torch.Tensor, meta: str) -> Callable[[Path], None]:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages: pip install 'ebood[export]' ({exc})") from None
    batch = torch.export.Dim("batch", min=1)
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the exporter logs a line per missing optional package (torchvision)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped, (x,), dynamo=True, input_names=["inputs"], output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},), verbose=False, report=False,
            )
    except Exception as exc:  # the exporter's own error types vary between torch versions
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"detector {wrapped.detector_name!r}: torch.onnx cannot export this module: {first}") from exc
    finally:
        logger.setLevel(level)
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = "ebood", meta
    return lambda tmp: onnx.save(model, str(tmp))


# ----- loading -----------------------------------------------------------------------------------


class ExportedDetector:
    """An exported wrapped module loaded back: ``detector(x)`` returns ``{"logits", "score",
    "is_ood"}`` as torch tensors on the CPU (``x`` a tensor or array of shape ``(N, *input_shape)``);
    ``metadata`` is the JSON description written by :func:`export`."""

    def __init__(self, run: Callable[[torch.Tensor], dict[str, torch.Tensor]], metadata: dict[str, Any], path: Path) -> None:
        self._run = run
        self.metadata = metadata
        self.path = path

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.metadata["input_shape"])

    @property
    def input_dtype(self) -> torch.dtype:
        return getattr(torch, self.metadata.get("input_dtype", "float32"))

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def detector_name(self) -> str:
        return str(self.metadata["detector"])

    def __call__(self, x: Any) -> dict[str, torch.Tensor]:
        return self._run(torch.as_tensor(x))

    def __repr__(self) -> str:
        return f"ExportedDetector({self.path.name!r}, detector={self.detector_name!r}, input_shape={self.input_shape})"


def _parse_metadata(text: str | bytes, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except (ValueError, TypeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise ExportError(f"{path}: not a module exported by ebood (no valid {METADATA_NAME} description)")
    return meta


def load_exported(path: str | Path) -> ExportedDetector:
    """Load a file written by :func:`export` (format from the suffix). Never unpickles."""
    path = Path(path)
    fmt = format_of(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        if fmt == "export":
            extra = {METADATA_NAME: ""}
            program = torch.export.load(str(path), extra_files=extra)
            module = program.module()
            return ExportedDetector(lambda x: dict(module(x)), _parse_metadata(extra[METADATA_NAME], path), path)
        if fmt == "torchscript":
            extra = {METADATA_NAME: ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            return ExportedDetector(lambda x: dict(scripted(x)), _parse_metadata(extra[METADATA_NAME], path), path)
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: cannot load the exported module: {first}") from exc
    return _load_onnx(path)


def _load_onnx(path: Path) -> ExportedDetector:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError(f"running an ONNX file needs onnx and onnxruntime: pip install 'ebood[export]' ({exc})") from None
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: cannot load the ONNX file: {first}") from exc
    meta = _parse_metadata(props.get("ebood", ""), path)
    input_name = session.get_inputs()[0].name
    dtype = getattr(np, meta.get("input_dtype", "float32"))

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = session.run(list(OUTPUT_NAMES), {input_name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=dtype)})
        return {name: torch.from_numpy(np.asarray(v)) for name, v in zip(OUTPUT_NAMES, values)}

    return ExportedDetector(run, meta, path)
