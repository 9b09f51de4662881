"""Running a classifier once over a dataset: logits, features, labels and its head, in one pass.

``ebood.extract(model, data)`` is the only place where ebood runs a model for post-hoc detectors:
every detector is then fitted and scored on the returned :class:`ebood.Outputs`, so evaluating ten
detectors costs one forward pass per dataset, not ten (OpenOOD and oodeel re-run the network for
every postprocessor).

What is returned
    * ``logits``: the model's output, which must be an (N, C) tensor; a model returning a tuple,
      a dict or an object is used with ``output=`` (an index, a key / attribute name or a function).
    * ``features``: by default the input of the model's last ``nn.Linear`` (the penultimate
      representation, found as the last ``nn.Linear`` *called* in the first forward pass), a single
      (N, D) tensor. With ``layers=["layer3", ...]`` (names from ``model.named_modules()``) a dict of
      the outputs of those submodules, always followed by the entry ``"penultimate"`` (the head's
      input, so that ``Outputs.head`` applies to the last entry). Feature maps with more than two
      dimensions are reduced over every axis after the channel axis: ``pool="avg"`` (global average
      pooling, default), ``"max"``, or ``"flatten"`` to keep every value.
    * ``head``: the last ``nn.Linear`` as an :class:`ebood.Head` (``None`` for a model without one).
    * ``labels``: (N,) int64 class labels, or ``None`` when the data have none. A label of ``-1``
      means "no label" (OOD sets): a set whose labels are all ``-1`` gives ``labels=None``; a set
      mixing ``-1`` with class labels keeps the ``-1`` entries as they are.

How it runs
    Under ``torch.inference_mode()`` with every submodule in eval mode (each module's own mode is
    restored afterwards), on ``device`` (CPU, CUDA or MPS; default: where the model's parameters
    are; a model elsewhere is moved there for the run and moved back), with optional autocast
    (``amp="bfloat16"`` / ``"float16"`` / ``True``). Results come back in float32 (float64 for a
    float64 model) on the CPU (``result_device`` to change). Forward hooks are removed afterwards,
    also when an exception interrupts the run. A progress bar with throughput is shown when
    ``progress`` is true and stderr is a terminal.

Caching
    With ``cache=DIR`` the outputs are stored in ``DIR/<key>.safetensors`` (written with
    :func:`ebood.state.save_state`, so a damaged file fails its checksum; the files are
    :mod:`ebood.outputs_cache`). The key hashes the
    model's class, structure (``repr``), parameters and buffers; the layer list, pooling and output
    selection; and the data's identity: the dataset's ``fingerprint`` attribute when it has one
    (``ebood.data`` sets provide it), the full content for arrays and tensors, and otherwise its
    length and a hash of its first and last batches. A second call with the same model and data
    loads the file instead of running the model. A corrupt entry, or one whose header does not
    match the key, is reported with a warning and recomputed. Data whose identity cannot be
    established (a shuffling DataLoader, an iterable without ``fingerprint``) are not cached
    (with a warning). Changes to a model's Python ``forward`` code that leave its modules and
    weights alone are not detected.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, TensorDataset

from .outputs import Head, Outputs
from .outputs_cache import read_cached_outputs, write_cached_outputs
from .progress import progress_bar
from .runtime import DeviceError, model_inputs, parse_device

__all__ = [
    "extract",
    "ExtractionError",
    "PENULTIMATE",
    "LayerTap",
    "as_loader",
    "split_batch",
    "select_output",
    "resolve_device",
    "eval_mode",
    "on_device",
    "model_fingerprint",
    "data_identity",
]

#: The name of the head's input among ``layers`` (and in ``Outputs.features`` dicts).
PENULTIMATE = "penultimate"
_CACHE_LAYOUT = 1  # bump when the cached content for the same key changes meaning
DEFAULT_BATCH_SIZE = 256
_INPUT_KEYS = ("input", "inputs")
_LABEL_KEYS = ("label", "labels")

OutputSelector = int | str | Callable[[Any], torch.Tensor] | None
Pool = Literal["avg", "max", "flatten"]


class ExtractionError(ValueError):
    """The model, its output, a layer name or the data cannot be used; the message says which."""


# ----- data --------------------------------------------------------------------------------------


def _is_map_style(data: Any) -> bool:
    return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (IterableDataset, Mapping, str, bytes))


def _array_dataset(data: Any) -> Dataset | None:
    """A TensorDataset for an array / tensor of inputs, or an ``(inputs, labels)`` pair of them."""
    def tensor(a: Any) -> torch.Tensor | None:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, np.ndarray) and a.dtype != object:
            return torch.from_numpy(np.ascontiguousarray(a))
        return None

    single = tensor(data)
    if single is not None:
        if single.ndim < 1:
            raise ExtractionError("data is a 0-d array; expected an array of inputs (N, ...)")
        return TensorDataset(single)
    if isinstance(data, tuple) and len(data) == 2:
        x, y = tensor(data[0]), tensor(data[1])
        if x is not None and y is not None:
            if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
                raise ExtractionError(f"(inputs, labels) arrays must be (N, ...) and (N,), got shapes {tuple(x.shape)} and {tuple(y.shape)}")
            return TensorDataset(x, y)
    return None


def as_loader(data: Any, batch_size: int | None = None, num_workers: int = 0, pin_memory: bool = False) -> Iterable[Any]:
    """An iterable of batches for ``data``: a DataLoader as given, a Dataset (or arrays) batched.

    ``data`` may be a ``DataLoader`` (used as is; ``batch_size`` must then be ``None``), a map-style
    or iterable ``Dataset`` (batched in order), a tensor / array of inputs, an ``(inputs, labels)``
    pair of arrays, or any other iterable of ready-made batches.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ExtractionError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, DataLoader):
        if batch_size is not None:
            raise ExtractionError(f"batch_size={batch_size} applies to a Dataset; this DataLoader already batches (batch_size={data.batch_size})")
        return data
    arrays = _array_dataset(data)
    if arrays is not None:
        data = arrays
    if isinstance(data, (IterableDataset,)) or _is_map_style(data):
        if _is_map_style(data) and len(data) == 0:
            raise ExtractionError("data is empty: the dataset has 0 samples")
        if getattr(data, "batch_indexing", False):  # in-memory tensors: one slice per batch, no per-sample stacking
            batches = BatchSampler(SequentialSampler(data), batch_size or DEFAULT_BATCH_SIZE, drop_last=False)
            return DataLoader(data, sampler=batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        return DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        return data
    raise ExtractionError(
        f"cannot read data of type {type(data).__name__}: give a DataLoader, a Dataset, an array / tensor of inputs "
        "or an (inputs, labels) pair"
    )


def _num_samples(data: Any, loader: Iterable[Any]) -> int | None:
    ds = loader.dataset if isinstance(loader, DataLoader) else data
    try:
        return len(ds)  # type: ignore[arg-type]
    except TypeError:
        return None


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels or None)`` of a collated batch: a tensor, an ``(input, label)`` pair or a dict."""
    if isinstance(batch, torch.Tensor):
        x, y = batch, None
    elif isinstance(batch, Mapping):
        key = next((k for k in _INPUT_KEYS if k in batch), None)
        if key is None:
            raise ExtractionError(
                f"data items are dicts with keys {', '.join(map(repr, batch))}; expected an 'input' key (and optionally 'label')"
            )
        x = batch[key]
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    elif isinstance(batch, (list, tuple)):
        if len(batch) == 1:
            x, y = batch[0], None
        elif len(batch) == 2:
            x, y = batch
        else:
            raise ExtractionError(
                f"data items have {len(batch)} elements; expected an input, an (input, label) pair or a dict with 'input' / 'label'"
            )
    else:
        raise ExtractionError(f"unexpected data item of type {type(batch).__name__}; expected a tensor, an (input, label) pair or a dict")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ExtractionError(f"inputs must be tensors or arrays, got a batch of type {type(x).__name__}")
    if y is not None:
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1 or len(y) != len(x):
            raise ExtractionError(
                f"labels must be one integer per input; got dtype {y.dtype} and shape {tuple(y.shape)} for {len(x)} inputs"
            )
    return x, y


# ----- model -------------------------------------------------------------------------------------


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (checked to be available), or the device of the model's weights."""
    if device is None:
        t = next(iter(model.parameters()), None)
        if t is None:
            t = next(iter(model.buffers()), None)
        return t.device if t is not None else torch.device("cpu")
    try:
        return parse_device(device)
    except DeviceError as exc:
        raise ExtractionError(str(exc)) from None


def _weights_device(model: nn.Module) -> torch.device | None:
    t = next(iter(model.parameters()), None)
    return None if t is None else t.device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's own ``training`` flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Move the model to ``device`` for the duration of the block (and back afterwards)."""
    before = _weights_device(model)
    moved = before is not None and before != device
    if moved:
        model.to(device)
    try:
        yield
    finally:
        if moved:
            model.to(before)


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys " + ", ".join(f"{k!r} ({_describe(v)})" for k, v in out.items())
    if isinstance(out, (list, tuple)):
        return f"a {type(out).__name__} of {len(out)} items: " + ", ".join(f"[{i}] {_describe(v)}" for i, v in enumerate(out))
    return f"a {type(out).__name__}"


def select_output(out: Any, output: OutputSelector = None) -> torch.Tensor:
    """The (N, C) logits among a model's output: the output itself, ``out[output]``, an attribute
    ``output`` of it, or ``output(out)`` for a function. Anything else is an :class:`ExtractionError`."""
    if output is None:
        logits = out
    elif callable(output):
        logits = output(out)
    elif isinstance(out, Mapping) and output in out:
        logits = out[output]
    elif isinstance(out, (list, tuple)) and isinstance(output, int) and -len(out) <= output < len(out):
        logits = out[output]
    elif isinstance(output, str) and hasattr(out, output):
        logits = getattr(out, output)
    else:
        raise ExtractionError(f"output={output!r} selects nothing: the model returned {_describe(out)}")
    if not isinstance(logits, torch.Tensor):
        hint = " Select the logits with output= (an index, a key or a function)." if output is None else ""
        raise ExtractionError(f"the model's output is {_describe(logits)}, not an (N, C) tensor of logits.{hint}")
    if logits.ndim != 2:
        raise ExtractionError(
            f"the model's output has shape {tuple(logits.shape)}; ebood needs (N, C) logits "
            "(select or reshape them with output=, e.g. a function)"
        )
    return logits


def _output_key(output: OutputSelector) -> str:
    if callable(output):
        return f"callable:{getattr(output, '__module__', '?')}.{getattr(output, '__qualname__', type(output).__name__)}"
    return repr(output)


# ----- hooks -------------------------------------------------------------------------------------


def _pool(t: torch.Tensor, pool: Pool) -> torch.Tensor:
    if t.ndim <= 2:
        return t
    if pool == "avg":
        return t.mean(dim=tuple(range(2, t.ndim)))
    if pool == "max":
        return t.amax(dim=tuple(range(2, t.ndim)))
    return t.reshape(t.shape[0], -1)


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Check ``layers`` against ``model.named_modules()`` (suggesting close names for a typo) and
    return them in order with :data:`PENULTIMATE` last."""
    if layers is None:
        return [PENULTIMATE]
    if isinstance(layers, str):
        layers = [layers]
    names = [str(n) for n in layers]
    if not names:
        raise ExtractionError("layers is empty; give None (the penultimate layer) or at least one module name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExtractionError(f"layers lists {', '.join(map(repr, dup))} more than once")
    modules = dict(model.named_modules())
    for name in names:
        if name != PENULTIMATE and name not in modules:
            candidates = [n for n in modules if n]
            close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            top = [n for n in candidates if "." not in n][:12]
            raise ExtractionError(
                f"{type(model).__name__} has no submodule {name!r}.{hint} Top-level modules: {', '.join(top) or '(none)'}; "
                f"use names from model.named_modules(), or {PENULTIMATE!r} for the head's input"
            )
    return [n for n in names if n != PENULTIMATE] + [PENULTIMATE]


class LayerTap:
    """Forward hooks that keep, for the latest forward pass, the pooled outputs of named submodules
    and, when ``layers`` includes :data:`PENULTIMATE`, the input of the model's head (the last
    ``nn.Linear`` called, settled by :meth:`finish_batch` after the first pass).

    Use as a context manager: every hook is removed on exit, also after an exception. ``values``
    maps each layer name (and :data:`PENULTIMATE`) to an (N, D) tensor; ``head`` is the head module
    once a forward pass has run. With ``detach=False`` the values keep their autograd graph (for
    detectors that differentiate through features). ``enabled = False`` pauses recording.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, pool: Pool = "avg", detach: bool = True) -> None:
        if pool not in ("avg", "max", "flatten"):
            raise ExtractionError(f"pool must be 'avg', 'max' or 'flatten', got {pool!r}")
        self.model = model
        self.layers = [n for n in layers if n != PENULTIMATE]
        self.want_head = PENULTIMATE in layers
        self.pool = pool
        self.detach = detach
        self.enabled = True
        self.values: dict[str, torch.Tensor] = {}
        self.head: nn.Linear | None = None
        self.head_name: str | None = None
        self.head_output: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._linear_handles: dict[str, Any] = {}
        self._calls: list[str] = []

    # context management
    def __enter__(self) -> "LayerTap":
        if isinstance(self.model, torch.jit.ScriptModule) and self.layers:
            raise ExtractionError(
                "a TorchScript model runs as compiled code, so ebood cannot read its intermediate layers; "
                "use layers=None (logits only) or load the model from Python code (an entry point)"
            )
        try:
            modules = dict(self.model.named_modules())
            for name in self.layers:
                self._handles.append(modules[name].register_forward_hook(self._layer_hook(name)))
            if self.want_head and not isinstance(self.model, torch.jit.ScriptModule):
                for name, m in modules.items():
                    if isinstance(m, nn.Linear):
                        self._linear_handles[name] = m.register_forward_hook(self._linear_hook(name, m))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles + list(self._linear_handles.values()):
            h.remove()
        self._handles.clear()
        self._linear_handles.clear()

    def start_batch(self) -> None:
        self.values = {}
        self._calls = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        pooled = _pool(t.detach() if self.detach else t, self.pool)
        # A later in-place op (ReLU(inplace=True)) must not change what was recorded.
        if self.detach and pooled.data_ptr() == t.data_ptr():
            pooled = pooled.clone()
        return pooled

    def _layer_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.enabled:
                return
            if not isinstance(out, torch.Tensor):
                raise ExtractionError(f"layer {name!r} ({type(module).__name__}) returns {_describe(out)}; choose a submodule that returns a tensor")
            if out.ndim < 2:
                raise ExtractionError(f"layer {name!r} returns a tensor of shape {tuple(out.shape)}; expected (N, D) or (N, C, ...)")
            self.values[name] = self._keep(out)

        return hook

    def _linear_hook(self, name: str, module: nn.Linear) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if not self.enabled:
                return
            self._calls.append(name)
            if self.head_name is None or name == self.head_name:
                self.values[PENULTIMATE] = args[0] if not self.detach else args[0].detach()
                self.head_output = out
        return hook

    def drop_head(self) -> None:
        """Forget the head (the last Linear turned out not to produce the logits)."""
        self.head, self.head_name, self.head_output = None, None, None
        self.want_head = False
        self.values.pop(PENULTIMATE, None)
        for h in self._linear_handles.values():
            h.remove()
        self._linear_handles.clear()

    def finish_batch(self) -> None:
        """Settle which Linear is the head (after the first batch) and post-process its input."""
        if not self.want_head or isinstance(self.model, torch.jit.ScriptModule):
            return
        if self.head_name is None:
            if not self._calls:
                return
            self.head_name = self._calls[-1]
            self.head = dict(self.model.named_modules())[self.head_name]  # type: ignore[assignment]
            for name, h in list(self._linear_handles.items()):
                if name != self.head_name:
                    h.remove()
                    del self._linear_handles[name]
        if PENULTIMATE in self.values:
            feat = self.values[PENULTIMATE]
            if feat.ndim != 2:  # a Linear applied to tokens / maps is not a classifier head
                self.drop_head()
                return
            if self.detach:
                feat = feat.clone()
            self.values[PENULTIMATE] = feat


# ----- fingerprints and cache ---------------------------------------------------------------------


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class, structure (``repr``), parameters and buffers."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}\n".encode())
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind}:{name}|".encode())
            _hash_tensor(h, t)
    return h.hexdigest()


def _hash_obj(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        _hash_tensor(h, obj)
    elif isinstance(obj, np.ndarray):
        _hash_tensor(h, torch.from_numpy(np.ascontiguousarray(obj)) if obj.dtype != object else torch.tensor([]))
        if obj.dtype == object:
            h.update(repr(obj.tolist()).encode())
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(f"k:{k}|".encode())
            _hash_obj(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"seq{len(obj)}|".encode())
        for v in obj:
            _hash_obj(h, v)
    elif isinstance(obj, (int, float, str, bool, type(None))):
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())
    else:  # e.g. a PIL image
        try:
            _hash_obj(h, np.asarray(obj))
        except Exception:
            h.update(repr(obj).encode())


def data_identity(data: Any, batch_size: int | None = None) -> tuple[str | None, str]:
    """``(identity, reason)``: a string identifying ``data`` for the cache, or ``None`` and why not.

    The dataset's ``fingerprint`` attribute when it has one; for arrays and tensors a hash of the
    whole content; otherwise the length and a hash of the first and last ``batch_size`` items.
    """
    ds = data.dataset if isinstance(data, DataLoader) else data
    order = ""
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            return None, "the DataLoader shuffles, so the order of the outputs changes from run to run"
        order = f"|sampler={type(data.sampler).__name__}"
        batch_size = data.batch_size or batch_size
    fingerprint = getattr(ds, "fingerprint", None)
    if isinstance(fingerprint, str) and fingerprint:
        return f"fingerprint:{fingerprint}{order}", ""
    h = hashlib.blake2b(digest_size=20)
    arrays = _array_dataset(ds)
    if arrays is not None or isinstance(ds, TensorDataset):
        for t in (arrays or ds).tensors:  # type: ignore[union-attr]
            _hash_tensor(h, t)
        return f"arrays:{h.hexdigest()}{order}", ""
    if not _is_map_style(ds):
        return None, f"a {type(ds).__name__} without a 'fingerprint' attribute can only be identified by reading all of it"
    n = len(ds)
    b = min(n, batch_size or DEFAULT_BATCH_SIZE)
    for i in sorted(set(range(b)) | set(range(n - b, n))):
        _hash_obj(h, ds[i])
    return f"{type(ds).__module__}.{type(ds).__qualname__}|n={n}|edges={h.hexdigest()}{order}", ""


def _cache_key(model: nn.Module, layers: Sequence[str] | None, pool: str, output: OutputSelector, amp: torch.dtype | None, identity: str) -> str:
    h = hashlib.sha256()
    parts = [
        f"layout={_CACHE_LAYOUT}",
        f"model={model_fingerprint(model)}",
        f"layers={None if layers is None else list(layers)!r}",
        f"pool={pool}",
        f"output={_output_key(output)}",
        f"amp={amp}",
        f"data={identity}",
    ]
    h.update("\n".join(parts).encode())
    return h.hexdigest()


# ----- the pass ----------------------------------------------------------------------------------


_AMP_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _amp_dtype(amp: Any, device: torch.device) -> torch.dtype | None:
    if amp is None or amp is False:
        return None
    if amp is True:
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    if isinstance(amp, torch.dtype) and amp in (torch.bfloat16, torch.float16):
        return amp
    if isinstance(amp, str) and amp.lower() in _AMP_NAMES:
        return _AMP_NAMES[amp.lower()]
    raise ExtractionError(f"amp must be None, True, 'bfloat16' or 'float16', got {amp!r}")


def _result_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point() else t


class _Collected:
    """Per-batch results, concatenated at the end."""

    def __init__(self, layers: list[str], result_device: torch.device) -> None:
        self.layers = layers
        self.device = result_device
        self.logits: list[torch.Tensor] = []
        self.features: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.labels: list[torch.Tensor | None] = []

    def add(self, logits: torch.Tensor, values: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        n = logits.shape[0]
        self.logits.append(_result_dtype(logits).to(self.device))
        for name in self.layers:
            if name not in values:
                continue
            v = values[name]
            if v.shape[0] != n:
                raise ExtractionError(f"layer {name!r} gave {v.shape[0]} rows for a batch of {n} inputs; choose a layer with one row per input")
            self.features[name].append(_result_dtype(v).to(self.device))
        self.labels.append(None if labels is None else labels.to(self.device, torch.int64))

    def outputs(self, head: Head | None, as_dict: bool) -> Outputs:
        if not self.logits:
            raise ExtractionError("data is empty: no batch was produced")
        logits = torch.cat(self.logits)
        feats: Any = None
        present = {k: v for k, v in self.features.items() if v}
        for k, v in present.items():
            if len(v) != len(self.logits):
                raise ExtractionError(f"layer {k!r} was not called in every forward pass; choose a layer the model always uses")
        if as_dict:
            feats = {k: torch.cat(v) for k, v in present.items()} or None
        elif PENULTIMATE in present:
            feats = torch.cat(present[PENULTIMATE])
        has_labels = [y is not None for y in self.labels]
        labels = None
        if any(has_labels):
            if not all(has_labels):
                raise ExtractionError("some batches have labels and others do not")
            labels = torch.cat(self.labels)  # type: ignore[arg-type]
            if bool((labels == -1).all()):
                labels = None  # an unlabelled (OOD) set
        if head is not None and (feats is None or (isinstance(feats, dict) and PENULTIMATE not in feats)):
            head = None
        return Outputs(logits=logits, features=feats, labels=labels, head=head)


def _check_head(tap: LayerTap, logits: torch.Tensor, explicit: bool) -> None:
    """After the first batch: is the last Linear really the classifier head?"""
    if tap.head is None or tap.head_output is None:
        if explicit:
            why = ("a TorchScript model runs as compiled code, so its layers cannot be read"
                   if isinstance(tap.model, torch.jit.ScriptModule) else "the model calls no nn.Linear whose (N, D) input could be the penultimate layer")
            raise ExtractionError(f"layer {PENULTIMATE!r}: {why}")
        return
    out = tap.head_output
    if out.ndim != 2 or out.shape != logits.shape:
        msg = (f"the last nn.Linear called ({tap.head_name!r}) gives shape {tuple(out.shape)}, not the logits' "
               f"{tuple(logits.shape)}, so it is not the classifier head")
        if explicit:
            raise ExtractionError(f"layer {PENULTIMATE!r}: {msg}")
        warnings.warn(f"{msg}; returning no head and no penultimate features", RuntimeWarning, stacklevel=4)
        tap.drop_head()
        return
    if not torch.allclose(out.float(), logits.float(), rtol=1e-3, atol=1e-3):
        warnings.warn(
            f"the model's logits differ from the output of its last nn.Linear ({tap.head_name!r}); "
            "Outputs.head will not reproduce the logits exactly",
            RuntimeWarning,
            stacklevel=4,
        )


def extract(
    model: nn.Module,
    data: Any,
    *,
    layers: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    amp: bool | str | torch.dtype | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    output: OutputSelector = None,
    pool: Pool = "avg",
    result_device: str | torch.device = "cpu",
    num_workers: int = 0,
    on_batch: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
) -> Outputs:
    """Run ``model`` once over ``data`` and return its :class:`ebood.Outputs`.

    See the module docstring for the details. ``data`` is a DataLoader, a Dataset (batched by
    ``batch_size``, default 256, in order), a tensor / array of inputs or an ``(inputs, labels)``
    pair; items are inputs, ``(input, label)`` pairs or dicts with ``"input"`` / ``"label"``.

    ``on_batch(inputs, labels)``, if given, is called for every batch after the forward pass, with
    the inputs on ``device``, outside inference mode and with the model in eval mode: model-level
    detectors use it to score the same batches in the same pass over the data. When the outputs
    come from the cache, the data are still read for ``on_batch`` but the model is not run.
    """
    if not isinstance(model, nn.Module):
        raise ExtractionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if pool not in ("avg", "max", "flatten"):
        raise ExtractionError(f"pool must be 'avg', 'max' or 'flatten', got {pool!r}")
    dev = resolve_device(model, device)
    amp_dtype = _amp_dtype(amp, dev)
    layer_list = resolve_layers(model, layers)
    loader = as_loader(data, batch_size, num_workers, pin_memory=dev.type == "cuda")
    total = _num_samples(data, loader)
    if total == 0:
        raise ExtractionError("data is empty: the dataset has 0 samples")

    path, key = None, None
    if cache is not None:
        identity, reason = data_identity(data, batch_size)
        if identity is None:
            warnings.warn(f"not caching: {reason}; give the dataset a 'fingerprint' attribute to cache it", RuntimeWarning, stacklevel=2)
        else:
            key = _cache_key(model, None if layers is None else layer_list, pool, output, amp_dtype, identity)
            path = Path(cache) / f"{key[:40]}.safetensors"
            cached = read_cached_outputs(path, key)
            if cached is not None:
                if on_batch is not None:
                    _visit(model, loader, dev, on_batch, total, progress)
                return cached.to(result_device)

    asked_penultimate = layers is not None and PENULTIMATE in ([layers] if isinstance(layers, str) else list(layers))
    result = _run(model, loader, layer_list, explicit=layers is not None, asked_penultimate=asked_penultimate, dev=dev, amp_dtype=amp_dtype, output=output,
                  pool=pool, result_device=torch.device(result_device), total=total, progress=progress, on_batch=on_batch)
    if path is not None and key is not None:
        write_cached_outputs(path, key, result, {"model": type(model).__name__, "layers": layer_list, "pool": pool})
    return result


def _visit(model: nn.Module, loader: Iterable[Any], dev: torch.device, on_batch: Callable[..., None], total: int | None, progress: bool) -> None:
    """Read the data for ``on_batch`` only (the extraction outputs came from the cache)."""
    with on_device(model, dev), eval_mode(model), progress_bar(progress, total, "scoring") as bar:
        for batch in loader:
            x, y = split_batch(batch)
            on_batch(x.to(dev, non_blocking=True), y)
            bar.advance(len(x))


def _run(model: nn.Module, loader: Iterable[Any], layer_list: list[str], *, explicit: bool, asked_penultimate: bool, dev: torch.device, amp_dtype: torch.dtype | None,
         output: OutputSelector, pool: Pool, result_device: torch.device, total: int | None, progress: bool,
         on_batch: Callable[..., None] | None) -> Outputs:
    collected = _Collected(layer_list, result_device)
    autocast = (lambda: torch.autocast(device_type=dev.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    first = True
    with on_device(model, dev), eval_mode(model), LayerTap(model, layer_list, pool=pool) as tap, progress_bar(progress, total, "extracting") as bar:
        for batch in loader:
            x, y = split_batch(batch)
            x = x.to(dev, non_blocking=True)
            tap.enabled = True
            tap.start_batch()
            with torch.inference_mode(), autocast(), model_inputs(x):
                logits = select_output(model(x), output)
            tap.finish_batch()
            if logits.shape[0] != x.shape[0]:
                raise ExtractionError(f"the model returned {logits.shape[0]} rows of logits for a batch of {x.shape[0]} inputs")
            if first:
                _check_head(tap, logits, asked_penultimate)
                first = False
            tap.enabled = False
            tap.head_output = None
            collected.add(logits, tap.values, y)
            if on_batch is not None:
                on_batch(x, y)
            bar.advance(len(x))
        head = Head.from_linear(tap.head) if tap.head is not None else None
    if head is not None:
        head = head.to(result_device)
    return collected.outputs(head, as_dict=explicit)
