"""msma scoring cost against one forward pass of its own score network, in one run.

MSMA scores an input with the norms of its estimated score at all L noise scales and a Gaussian
mixture on them. ebood's score networks condition on the noise level in their output layer, so the
L norms come from ONE forward pass; this script checks that the whole ``score`` (standardising,
the pass, the norms, the mixture's log-density) costs about what the bare network forward costs,
for both variants (``on="features"``: MLP on 64-d features; ``on="inputs"``: conv net on images),
and prints the ratio ``score time / forward time`` (the target: <= ~1.1) next to what the
paper's NCSN-style network, conditioned at every layer, would need: L forward passes per input.

The detectors are fitted for a few epochs on synthetic data (the cost of scoring does not depend
on how well they were trained). Each time is the fastest of ``--repeats`` runs, one torch thread.

    python benchmarks/msma.py            # 20000 feature vectors, 5000 8x8 images, 10 scales
    python benchmarks/msma.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse

import torch

from ebood import Outputs
from ebood.detectors import create
from _timing import best_time  # benchmarks/_timing.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_feat, n_img = (2000, 500) if args.quick else (20000, 5000)
    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(n_feat, 64, generator=g) + 1)
    images = torch.rand(n_img, 1, 8, 8, generator=g)
    fit = dict(epochs=3, n_components=4, progress=False)
    cases = {
        "features (MLP, 64-d)": (create("msma", **fit).fit(Outputs(features=feats[:1000])), feats,
                                 lambda det, x: det.score(Outputs(features=x))),
        "inputs (conv, 1x8x8)": (create("msma", on="inputs", **fit).fit_inputs(None, images[:500]), images,
                                 lambda det, x: det.score_inputs(None, x)),
    }
    print(f"torch {torch.__version__}, 1 thread; fastest of {args.repeats} runs")
    print(f"{'variant':<24} {'N':>6} {'forward s':>10} {'score s':>10} {'score/forward':>14} {'L passes/forward':>17}")
    for name, (det, x, score) in cases.items():
        net = det.network()
        z = (x - det.shift_) / det.scale_
        with torch.no_grad():
            forward = best_time(lambda: net(z), args.repeats)
        scored = best_time(lambda: score(det, x), args.repeats)
        print(f"{name:<24} {x.shape[0]:>6} {forward:>10.4f} {scored:>10.4f} {scored / forward:>14.2f} {det.num_scales:>17}")


if __name__ == "__main__":
    main()
