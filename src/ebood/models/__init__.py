"""Classifiers for the benchmark protocols and :func:`load_model` (TorchScript, entry point, built-in).

``WideResNet`` (WRN-40-2, the energy paper's network), ``ResNet18`` (the CIFAR variant of OpenOOD
v1.5) and ``DigitsCNN`` (the built-in digits benchmark) all end in an ``nn.Linear`` head ``fc``.
"""

from .architectures import DigitsCNN, FashionCNN, ResNet18, WideResNet
from .loading import BUILTINS, ModelLoadError, load_model, load_state_dict

__all__ = ["WideResNet", "ResNet18", "DigitsCNN", "FashionCNN", "load_model", "load_state_dict", "BUILTINS", "ModelLoadError"]
