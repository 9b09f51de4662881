"""``load_model``: a classifier from a TorchScript file, a Python entry point or a built-in name,
optionally with a state-dict checkpoint. Never unpickles arbitrary objects.

* TorchScript: any existing file that ``torch.jit.load`` reads (code and weights together).
* Entry point: ``"package.module:function"`` (or ``module:Class``, ``module:obj.attr``): imported and
  called with ``**kwargs``; it must return an ``nn.Module``.
* Built-in names: :data:`BUILTINS` (``wrn40_2``, ``resnet18_cifar``, ``digits_cnn``, ``fashion_cnn``), called with
  ``**kwargs`` (e.g. ``num_classes=100``).
* Checkpoint: a state dict in a ``.safetensors`` file (an ebood checksum header, as written by
  ``ebood.train``, is verified), or a ``.pt`` / ``.pth`` / ``.bin`` file read with
  ``torch.load(weights_only=True)``. A training-script dict holding the state dict under
  ``state_dict`` / ``model`` / ``model_state_dict`` / ``net`` is unwrapped, and a ``module.`` prefix
  (``DataParallel``) is stripped. A folder holding ``model.safetensors`` (an ebood training
  checkpoint) is accepted too.
"""

from __future__ import annotations

import difflib
import importlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .architectures import DigitsCNN, FashionCNN, ResNet18, WideResNet

__all__ = ["load_model", "load_state_dict", "BUILTINS", "ModelLoadError"]


class ModelLoadError(ValueError):
    """A model spec or checkpoint that cannot be used; the message names the file and the problem."""


def _wrn40_2(**kwargs: Any) -> nn.Module:
    return WideResNet(**{"depth": 40, "widen_factor": 2, "dropout": 0.3, **kwargs})


#: Built-in architectures by name (the constructors take keyword arguments such as ``num_classes``).
BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "wrn40_2": _wrn40_2,
    "wideresnet": WideResNet,
    "resnet18_cifar": ResNet18,
    "resnet18": ResNet18,
    "digits_cnn": DigitsCNN,
    "fashion_cnn": FashionCNN,
}

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "model_state")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def load_model(spec: str | Path, checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """The ``nn.Module`` that ``spec`` describes (in eval mode, on the CPU), with ``checkpoint`` loaded.

    ``spec`` is a TorchScript file, an entry point ``package.module:function`` or a name from
    :data:`BUILTINS`; ``kwargs`` go to the entry point or built-in constructor. See the module
    docstring for the checkpoint formats. Errors are :class:`ModelLoadError` naming the problem.
    """
    model = _build(str(spec), kwargs)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        _apply_state(model, state, Path(checkpoint))
    return model.eval()


# ----- building the module -----------------------------------------------------------------------


def _looks_like_entry_point(spec: str) -> bool:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        return False
    # "C:\\models\\x.pt" or "./pkg:fn" are paths, not entry points.
    return all(part.isidentifier() for part in module.split(".")) and all(part.isidentifier() for part in attr.split("."))


def _build(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    path = Path(spec)
    if path.is_file():
        if kwargs:
            raise ModelLoadError(f"{spec}: a TorchScript file takes no constructor arguments, got {', '.join(kwargs)}")
        return _load_torchscript(path)
    if path.is_dir():
        raise ModelLoadError(f"{spec}: is a folder; give a TorchScript file, an entry point 'package.module:function' or a built-in name")
    if _looks_like_entry_point(spec):
        return _call(_resolve_entry_point(spec), kwargs, spec)
    if spec in BUILTINS:
        return _call(BUILTINS[spec], kwargs, spec)
    if path.suffix or "/" in spec or "\\" in spec:
        raise ModelLoadError(f"{spec}: no such model file")
    close = difflib.get_close_matches(spec, BUILTINS, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ModelLoadError(
        f"unknown model {spec!r}.{hint} Give a TorchScript file, an entry point 'package.module:function' "
        f"or a built-in name ({', '.join(BUILTINS)})"
    )


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # recent torch deprecates TorchScript in favour of torch.export; the files stay readable
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path}: not a TorchScript file (torch.jit.load failed: {str(exc).strip().splitlines()[0]}). "
            "A state dict is a checkpoint: pass it as checkpoint= together with a built-in name or an entry point; "
            "ebood does not unpickle whole models"
        ) from exc


def _resolve_entry_point(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"entry point {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"entry point {spec!r}: {type(obj).__name__} {getattr(obj, '__name__', module_name)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"entry point {spec!r}: {attr_path} is a {type(obj).__name__}, not a function or class")
    return obj


def _call(factory: Callable[..., Any], kwargs: dict[str, Any], spec: str) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"model {spec!r}: bad arguments {kwargs!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {spec!r}: returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


# ----- reading checkpoints -----------------------------------------------------------------------


def load_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``checkpoint`` (see the module docstring for the formats)."""
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise ModelLoadError(f"{path}: is a folder without model.safetensors; give a checkpoint file")
        path = path / "model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such checkpoint file")
    if path.suffix.lower() == ".safetensors":
        state: Any = _read_safetensors(path)
    else:
        state = _read_torch(path)
    return _unwrap(state, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from ..state import StateError, load_state

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ModelLoadError(f"{path}: not a readable safetensors file: {exc}") from exc
    try:
        if "ebood" in metadata:  # written by ebood: verify the checksum
            tensors, _ = load_state(path)
            return tensors
        from safetensors.torch import load_file

        return load_file(str(path))
    except StateError as exc:
        raise ModelLoadError(str(exc)) from exc
    except Exception as exc:
        raise ModelLoadError(f"{path}: corrupt safetensors file: {exc}") from exc


def _read_torch(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path}: not a PyTorch checkpoint (expected a zip archive written by torch.save, or a .safetensors file); "
            "the file may be damaged"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{path}: holds pickled Python objects that ebood refuses to load (torch.load with weights_only=True). "
            "Save only tensors, e.g. torch.save(model.state_dict(), path), or convert it to .safetensors"
        ) from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise ModelLoadError(f"{path}: cannot read checkpoint: {str(exc).strip().splitlines()[0]}") from exc


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"model": {"state_dict": {...}}} and similar nestings
        if isinstance(state, Mapping) and not _is_tensor_dict(state):
            inner = next((state[k] for k in _WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not _is_tensor_dict(state):
        kind = type(state).__name__
        keys = f" with keys {', '.join(map(str, list(state)[:8]))}" if isinstance(state, Mapping) else ""
        raise ModelLoadError(f"{path}: expected a state dict (parameter name -> tensor), found a {kind}{keys}")
    keys = list(state)
    if keys and all(str(k).startswith("module.") for k in keys):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return {str(k): v for k, v in state.items()}


def _is_tensor_dict(d: Mapping[Any, Any]) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _apply_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} of another shape (checkpoint vs model: {_few(wrong_shape)})")
        raise ModelLoadError(
            f"{path}: the checkpoint does not match the model {type(model).__name__}: keys " + "; ".join(parts)
            + " (wrong architecture or num_classes?)"
        )
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
