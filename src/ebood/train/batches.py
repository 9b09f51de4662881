"""Where training batches come from: seeded epochs of labelled data and an endless outlier stream.

Given a map-style ``Dataset`` (or tensors), ebood draws the sample order itself from the run's
seed, so the order of every epoch and the position in the outlier stream are functions of
``(seed, epoch)`` and ``step`` alone: a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would have seen. A ``DataLoader`` given by the caller is used as it is (its own
batch size and shuffling); resuming then restores weights and optimiser but not the data order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["LabelledSource", "OutlierSource", "as_dataset", "derived_seed", "split_batch"]

# Separate random streams for the ID order and the outlier order (see derived_seed).
_ID_STREAM = 1
_OUTLIER_STREAM = 2


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys``, independent of the others (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *keys]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def as_dataset(data: Any, name: str) -> Dataset | DataLoader:
    """A Dataset or DataLoader as given; a tensor ``x`` or a tuple ``(x, y)`` becomes a TensorDataset."""
    if isinstance(data, (Dataset, DataLoader)):
        if isinstance(data, Dataset) and not hasattr(data, "__len__"):
            raise TypeError(f"{name} is an iterable-style dataset without a length; wrap it in a DataLoader")
        if isinstance(data, Dataset) and len(data) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{name} is empty: at least one sample is needed")
        return data
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        n = {int(t.shape[0]) for t in data}
        if len(n) != 1:
            raise ValueError(f"{name}: tensors have different lengths {sorted(n)}")
        if n == {0}:
            raise ValueError(f"{name} is empty: at least one sample is needed")
        return TensorDataset(*data)
    raise TypeError(
        f"{name} must be a torch Dataset, a DataLoader, a tensor of inputs or a tuple (inputs, labels) "
        f"of tensors, got {type(data).__name__}"
    )


def split_batch(batch: Any, name: str, need_labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels)`` from a collated batch that is ``(x, y, ...)`` or ``x`` alone."""
    if isinstance(batch, torch.Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        x = batch[0]
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    else:
        raise TypeError(f"{name} must yield tensors or (input, label) pairs, got a batch of {type(batch).__name__}")
    if need_labels and y is None:
        raise ValueError(f"{name} must yield (input, label) pairs: labels are needed for the cross-entropy")
    return x, y


def _loader(dataset: Dataset, batches: Iterable[list[int]], num_workers: int) -> DataLoader:
    # A private generator: otherwise every new DataLoader iterator draws its worker base seed from
    # the global RNG, which would shift the dropout masks of a resumed run.
    if getattr(dataset, "batch_indexing", False):  # in-memory tensors (ebood's ArrayDataset): one slice per batch
        return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=num_workers,  # type: ignore[arg-type]
                          generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,  # type: ignore[arg-type]
                      generator=torch.Generator().manual_seed(0))


@dataclass
class LabelledSource:
    """Epochs of ``(x, y)`` batches; order drawn from ``(seed, epoch)`` unless ``data`` is a DataLoader."""

    data: Dataset | DataLoader
    batch_size: int
    seed: int
    num_workers: int = 0
    name: str = "id_data"

    @property
    def controls_order(self) -> bool:
        return not isinstance(self.data, DataLoader)

    def __len__(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        if isinstance(self.data, DataLoader):
            return len(self.data)
        n = len(self.data)  # type: ignore[arg-type]
        return -(-n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.data, DataLoader):
            loader: Iterable[Any] = self.data
        else:
            order = _permutation(len(self.data), derived_seed(self.seed, _ID_STREAM, epoch))  # type: ignore[arg-type]
            batches = [b.tolist() for b in order.split(self.batch_size)]
            loader = _loader(self.data, batches, self.num_workers)
        for batch in loader:
            x, y = split_batch(batch, self.name, need_labels=True)
            yield x, y  # type: ignore[misc]


@dataclass
class OutlierSource:
    """An endless stream of outlier input batches, cycled independently of the ID epochs.

    For a Dataset, the stream is the concatenation of seeded permutations of the whole set
    (pass ``p`` shuffled with ``derived_seed(seed, OUTLIER, p)``), cut into batches of
    ``batch_size``; batch ``k`` is stream positions ``[k * batch_size, (k + 1) * batch_size)``,
    so any step can be started from directly. A DataLoader is re-iterated whenever exhausted.
    Labels (e.g. -1 for unlabelled sets) are ignored.
    """

    data: Dataset | DataLoader
    batch_size: int
    seed: int
    num_workers: int = 0
    name: str = "outlier_data"

    def _indices(self, start_batch: int) -> Iterator[list[int]]:
        n = len(self.data)  # type: ignore[arg-type]
        pos = start_batch * self.batch_size
        perm_pass, perm = -1, torch.empty(0, dtype=torch.long)
        while True:
            batch: list[int] = []
            while len(batch) < self.batch_size:
                p, offset = divmod(pos, n)
                if p != perm_pass:
                    perm_pass, perm = p, _permutation(n, derived_seed(self.seed, _OUTLIER_STREAM, p))
                take = min(self.batch_size - len(batch), n - offset)
                batch.extend(perm[offset : offset + take].tolist())
                pos += take
            yield batch

    def stream(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        if isinstance(self.data, DataLoader):
            while True:
                empty = True
                for batch in self.data:
                    empty = False
                    yield split_batch(batch, self.name, need_labels=False)[0]
                if empty:
                    raise ValueError(f"{self.name} yielded no batches")
        else:
            for batch in _loader(self.data, self._indices(start_batch), self.num_workers):
                yield split_batch(batch, self.name, need_labels=False)[0]
