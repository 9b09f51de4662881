"""What the serving tests serve: a digits CNN and a calibrated KNN detector, saved to files as a user would."""

from __future__ import annotations

from pathlib import Path

import torch

import ebood
from ebood.detectors import create

#: one input of the served model (a grey 8x8 digit)
SHAPE = (1, 8, 8)


def save_served_model(folder: Path):
    """Write ``ck.pt`` (a digits CNN's weights) and ``det.safetensors`` (KNN, k=5, calibrated at 80% TPR) to
    ``folder``; returns (model, detector)."""
    from ebood.models import load_model

    torch.manual_seed(0)
    net = load_model("digits_cnn")
    torch.save(net.state_dict(), folder / "ck.pt")
    x = torch.rand(160, *SHAPE, generator=torch.Generator().manual_seed(3))
    det = create("knn", k=5).fit(ebood.extract(net, x[:100], progress=False))
    det.calibrate(ebood.extract(net, x[100:], progress=False), tpr=0.8)
    det.save(folder / "det.safetensors")
    return net, det
