"""The energy-OOD paper's fine-tuning recipes as data (used by ``ebood finetune --preset``).

Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, and its
official code: a WideResNet-40-2 (dropout 0.3) pre-trained on CIFAR-10 / CIFAR-100 is fine-tuned
for 10 epochs, SGD with Nesterov momentum 0.9, weight decay 5e-4, learning rate 0.001
cosine-annealed per step to 1e-6, 128 ID + 256 outlier samples per step (the outliers were 80M
Tiny Images with CIFAR images removed: bring your own with ``--outliers``). Images are
normalised with the code's mean / std (the CIFAR-10 statistics, for CIFAR-100 too) and both the ID
images and the outliers are augmented with random 32x32 crops of the 4-pixel zero-padded image and
horizontal flips. Margins from the run
script: m_in = -23, m_out = -5 on CIFAR-10 and m_in = -27, m_out = -5 on CIFAR-100; loss weight
0.1 (energy) and 0.5 (Outlier Exposure). Reported mean FPR95 over six OOD sets: 3.32% (CIFAR-10)
and 47.55% (CIFAR-100) after energy fine-tuning; 8.53% / 58.10% with Outlier Exposure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .augment import RandomCropFlip

__all__ = ["FinetunePreset", "PretrainRecipe", "PRESETS", "get_preset", "available_presets"]


@dataclass(frozen=True)
class PretrainRecipe:
    """Settings of :func:`ebood.train.train_classifier` for a preset's model trained from scratch."""

    epochs: int
    lr: float
    optimizer: str = "sgd"
    batch_size: int = 128
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class FinetunePreset:
    """A fine-tuning recipe: model, data and every hyperparameter of :func:`ebood.train.finetune`.

    ``model`` is a name for ``ebood.models.load_model`` (``wrn40_2``: depth 40, widen factor 2,
    dropout 0.3), built with ``num_classes``; ``id_data`` a spec for ``ebood.data.open_dataset``,
    opened (like the outliers) with :meth:`data_options`; :meth:`augmentation` is the batch
    augmentation; ``pretrain`` the settings of ``train_classifier`` where the preset trains its
    model from scratch.
    """

    name: str
    description: str
    model: str
    num_classes: int
    id_data: str
    energy: dict[str, float]
    oe: dict[str, float]
    epochs: int = 10
    lr: float = 1e-3
    lr_min: float = 1e-6
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    id_batch_size: int = 128
    outlier_batch_size: int = 256
    pretrain: PretrainRecipe | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    image_size: int | None = None
    augment: bool = False

    def loss_params(self, loss: str) -> dict[str, float]:
        """The loss settings of the recipe for ``"energy"`` or ``"oe"``."""
        if loss not in ("energy", "oe"):
            raise ValueError(f"unknown loss {loss!r}; expected 'energy' or 'oe'")
        return dict(self.energy if loss == "energy" else self.oe)

    def data_options(self) -> dict[str, Any]:
        """Keyword arguments of ``ebood.data.open_dataset`` that prepare the data as the model expects."""
        opts: dict[str, Any] = {}
        if self.mean is not None:
            opts.update(mean=list(self.mean), std=list(self.std or ()))
        if self.image_size is not None:
            opts["image_size"] = self.image_size
        return opts

    def augmentation(self) -> RandomCropFlip | None:
        """The recipe's batch augmentation (random crop with 4 black pixels of padding + flip), or None."""
        if not self.augment:
            return None
        if self.mean is not None and self.std is not None:
            return RandomCropFlip.for_normalized(self.mean, self.std, padding=4)
        return RandomCropFlip(padding=4)

    def finetune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ebood.train.finetune` (all but the model, data and loss)."""
        keys = ("epochs", "lr", "lr_min", "momentum", "nesterov", "weight_decay", "id_batch_size",
                "outlier_batch_size")
        d = asdict(self)
        return {k: d[k] for k in keys}


#: Normalisation of the official energy-OOD code for CIFAR-10 and CIFAR-100 alike:
#: mean [125.3, 123.0, 113.9] / 255, std [63.0, 62.1, 66.7] / 255.
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

#: Margins of the built-in benchmark (see docs/training.md for how they were chosen).
BUILTIN_M_IN, BUILTIN_M_OUT = -15.0, -4.0

#: Margins of the Fashion-MNIST benchmark (see docs/benchmarks.md for how they were chosen).
FASHION_M_IN, FASHION_M_OUT = -11.0, -5.0

PRESETS: dict[str, FinetunePreset] = {
    "cifar10": FinetunePreset(
        name="cifar10",
        description="Liu et al. NeurIPS 2020: WRN-40-2 on CIFAR-10, energy margins -23 / -5",
        model="wrn40_2", num_classes=10, id_data="cifar10:train",
        energy={"m_in": -23.0, "m_out": -5.0, "weight": 0.1}, oe={"weight": 0.5},
        mean=CIFAR_MEAN, std=CIFAR_STD, image_size=32, augment=True,
    ),
    "cifar100": FinetunePreset(
        name="cifar100",
        description="Liu et al. NeurIPS 2020: WRN-40-2 on CIFAR-100, energy margins -27 / -5",
        model="wrn40_2", num_classes=100, id_data="cifar100:train",
        energy={"m_in": -27.0, "m_out": -5.0, "weight": 0.1}, oe={"weight": 0.5},
        mean=CIFAR_MEAN, std=CIFAR_STD, image_size=32, augment=True,
    ),
    "builtin": FinetunePreset(
        name="builtin",
        description="the built-in digits benchmark: DigitsCNN, auxiliary outliers builtin:outliers",
        model="digits_cnn", num_classes=10, id_data="builtin:digits-train",
        energy={"m_in": BUILTIN_M_IN, "m_out": BUILTIN_M_OUT, "weight": 0.1}, oe={"weight": 0.5},
        epochs=10, lr=1e-2, id_batch_size=128, outlier_batch_size=256,
        pretrain=PretrainRecipe(epochs=10, lr=1e-2, optimizer="adam", batch_size=64),
    ),
    "fashion-mnist": FinetunePreset(
        name="fashion-mnist",
        description="the Fashion-MNIST benchmark: FashionCNN (7 epochs of Adam), one fine-tuning epoch on an ID subset",
        model="fashion_cnn", num_classes=10, id_data="fashion-mnist:train",
        energy={"m_in": FASHION_M_IN, "m_out": FASHION_M_OUT, "weight": 0.1}, oe={"weight": 0.5},
        epochs=1, lr=1e-2, id_batch_size=128, outlier_batch_size=128,
        pretrain=PretrainRecipe(epochs=7, lr=2e-3, optimizer="adam", batch_size=128, weight_decay=0.0),
    ),
}


def available_presets() -> list[str]:
    """Names of the fine-tuning presets."""
    return sorted(PRESETS)


def get_preset(name: str) -> FinetunePreset:
    """The preset called ``name``, or a ValueError listing the names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning preset {name!r}; available: {', '.join(available_presets())}") from None
