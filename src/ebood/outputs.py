"""What a model produced for a set of inputs: logits, features, labels and its classifier head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from ._arrays import as_float_tensor, as_tensor

__all__ = ["Head", "Outputs", "FIELDS"]

FIELDS = ("logits", "features", "labels", "head")


@dataclass(frozen=True)
class Head:
    """A classifier's last linear layer: ``logits = features @ weight.T + bias``.

    ``weight`` is (C, D), ``bias`` is (C,) (zeros when the layer has none).
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: Any, bias: Any = None) -> None:
        w = as_float_tensor(weight, "head weight")
        if w.ndim != 2:
            raise ValueError(f"head weight must be (C, D), got shape {tuple(w.shape)}")
        if bias is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        else:
            b = as_float_tensor(bias, "head bias")
            if b.shape != (w.shape[0],):
                raise ValueError(f"head bias must be ({w.shape[0]},) to match weight {tuple(w.shape)}, got {tuple(b.shape)}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)

    @classmethod
    def from_linear(cls, layer: torch.nn.Linear) -> "Head":
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        return cls(layer.weight.detach().clone(), bias)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of ``features`` (N, D), in the features' dtype."""
        if features.shape[-1] != self.dim:
            raise ValueError(f"features have dimension {features.shape[-1]}, head expects {self.dim}")
        w = self.weight.to(features.dtype, copy=False).to(features.device)
        b = self.bias.to(features.dtype, copy=False).to(features.device)
        return torch.addmm(b, features, w.T) if features.ndim == 2 else features @ w.T + b

    def to(self, *args: Any, **kwargs: Any) -> "Head":
        return Head(self.weight.to(*args, **kwargs), self.bias.to(*args, **kwargs))

    def __repr__(self) -> str:
        return f"Head(weight={_describe(self.weight)}, bias={_describe(self.bias)})"


def _describe(t: torch.Tensor) -> str:
    """``float32[360, 10]`` (plus the device when it is not the CPU)."""
    dtype = str(t.dtype).removeprefix("torch.")
    where = "" if t.device.type == "cpu" else f" on {t.device}"
    return f"{dtype}[{', '.join(map(str, t.shape))}]{where}"


def _as_features(features: Any) -> torch.Tensor | dict[str, torch.Tensor] | None:
    if features is None:
        return None
    if isinstance(features, Mapping):
        if not features:
            raise ValueError("features is an empty dict; give at least one layer")
        out = {}
        for name, f in features.items():
            t = as_float_tensor(f, f"features[{name!r}]")
            if t.ndim != 2:
                raise ValueError(f"features[{name!r}] must be (N, D), got shape {tuple(t.shape)}")
            out[str(name)] = t
        return out
    t = as_float_tensor(features, "features")
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D) or a dict of (N, D) tensors, got shape {tuple(t.shape)}")
    return t


@dataclass(frozen=True)
class Outputs:
    """A model's outputs for N inputs. Every field is optional; detectors say which they need.

    * ``logits``: (N, C) tensor.
    * ``features``: (N, D) tensor, or a dict of named (N, D_l) tensors (several layers; the last
      entry is the penultimate layer that ``head`` reads).
    * ``labels``: (N,) int64 class labels.
    * ``head``: the classifier's last linear layer, :class:`Head`.
    """

    logits: torch.Tensor | None = None
    features: torch.Tensor | dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None
    head: Head | None = None
    _n: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        logits = None if self.logits is None else as_float_tensor(self.logits, "logits")
        if logits is not None and logits.ndim != 2:
            raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
        features = _as_features(self.features)
        labels = None
        if self.labels is not None:
            labels = as_tensor(self.labels, "labels")
            if labels.is_floating_point():
                if not torch.equal(labels, labels.round()):
                    raise ValueError("labels must be integer class indices, got non-integer floats")
            elif labels.dtype == torch.bool or labels.is_complex():
                raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
            labels = labels.long()
            if labels.ndim != 1:
                raise ValueError(f"labels must be (N,), got shape {tuple(labels.shape)}")
        head = self.head
        if head is not None and not isinstance(head, Head):
            if isinstance(head, torch.nn.Linear):
                head = Head.from_linear(head)
            elif isinstance(head, tuple) and len(head) == 2:
                head = Head(*head)
            else:
                raise TypeError(f"head must be an ebood.Head, an nn.Linear or a (weight, bias) tuple, got {type(head).__name__}")
        sizes = {}
        if logits is not None:
            sizes["logits"] = logits.shape[0]
        if isinstance(features, dict):
            sizes.update({f"features[{k!r}]": v.shape[0] for k, v in features.items()})
        elif features is not None:
            sizes["features"] = features.shape[0]
        if labels is not None:
            sizes["labels"] = labels.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError("Outputs fields disagree on the number of samples: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
        if logits is not None and head is not None and logits.shape[1] != head.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes but head has {head.num_classes}")
        if head is not None and features is not None:
            d = self._penultimate(features).shape[1]
            if d != head.dim:
                raise ValueError(f"features have dimension {d} but head expects {head.dim}")
        object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "_n", next(iter(sizes.values()), 0))

    @staticmethod
    def _penultimate(features: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(features, dict):
            return next(reversed(features.values()))
        return features

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        # shapes and dtypes only: printing the tensors of a whole data set helps nobody
        parts = [f"n={self._n}"]
        if self.logits is not None:
            parts.append(f"logits={_describe(self.logits)}")
        if isinstance(self.features, dict):
            parts.append("features={" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in self.features.items()) + "}")
        elif self.features is not None:
            parts.append(f"features={_describe(self.features)}")
        if self.labels is not None:
            parts.append(f"labels={_describe(self.labels)}")
        if self.head is not None:
            parts.append(f"head={self.head!r}")
        return f"Outputs({', '.join(parts)})"

    def has(self, name: str) -> bool:
        return getattr(self, name) is not None

    def feature(self, layer: str | None = None) -> torch.Tensor:
        """The (N, D) features of ``layer``; by default the penultimate layer (the last dict entry)."""
        if self.features is None:
            raise ValueError("these Outputs have no features")
        if layer is None:
            return self._penultimate(self.features)
        if not isinstance(self.features, dict):
            raise ValueError(f"features are a single tensor, not a dict of layers; cannot select {layer!r}")
        if layer not in self.features:
            raise KeyError(f"no features for layer {layer!r}; available: {', '.join(self.features)}")
        return self.features[layer]

    def select(self, index: slice | torch.Tensor) -> "Outputs":
        """The outputs of a subset of the samples (the head is shared)."""

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        feats = self.features
        if isinstance(feats, dict):
            feats = {k: v[index] for k, v in feats.items()}
        elif feats is not None:
            feats = feats[index]
        return Outputs(take(self.logits), feats, take(self.labels), self.head)

    def batches(self, batch_size: int) -> Iterator["Outputs"]:
        """Consecutive batches of at most ``batch_size`` samples."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.select(slice(start, start + batch_size))

    def to(self, device: str | torch.device) -> "Outputs":
        """The same outputs on another device."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        feats = self.features
        feats = {k: v.to(device) for k, v in feats.items()} if isinstance(feats, dict) else mv(feats)
        head = None if self.head is None else self.head.to(device)
        return Outputs(mv(self.logits), feats, mv(self.labels), head)

    @classmethod
    def concat(cls, parts: list["Outputs"]) -> "Outputs":
        """Join outputs of consecutive batches (fields must be present in all or none)."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of Outputs")
        first = parts[0]

        def cat(name: str) -> torch.Tensor | None:
            vals = [getattr(p, name) for p in parts]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError(f"some Outputs have {name} and some do not")
            return torch.cat(vals)

        feats: Any = None
        if isinstance(first.features, dict):
            feats = {k: torch.cat([p.feature(k) for p in parts]) for k in first.features}
        elif first.features is not None:
            feats = cat("features")
        return cls(cat("logits"), feats, cat("labels"), first.head)
