"""Deployment: a classifier and its fitted detector as one exportable module, served over HTTP.

* :func:`wrap` (also ``ebood.wrap``): model + detector -> an ``nn.Module`` returning
  ``{"logits", "score", "is_ood"}`` in one forward pass (``module``; the detectors' tensor maths
  are in ``scorers``);
* :func:`export` / :func:`load_exported`: TorchScript, ``torch.export`` and ONNX files (``export``);
* ``ebood.deploy.serve``: a Ray Serve application around a wrapped module (``pip install 'ebood[serve]'``),
  imported on use.

This package builds on ``detectors``, ``models`` and ``extraction``; nothing below imports it.
"""

from .export import ExportError, ExportedDetector, export, format_of, load_exported
from .module import DEFAULT_INPUT_SHAPES, WrappedDetector, example_batch, wrap, wrap_files
from .scorers import UnsupportedDetectorError, supported

__all__ = ["wrap", "wrap_files", "WrappedDetector", "DEFAULT_INPUT_SHAPES", "example_batch", "export", "load_exported", "ExportedDetector", "ExportError", "format_of", "supported", "UnsupportedDetectorError"]
