"""Energy fine-tuning and Outlier Exposure on the built-in benchmark: the energy paper's table, offline.

For each seed: build the built-in benchmark (``ebood.data.builtin``: scikit-learn's digits as ID,
letters / photos / four noise sets as OOD test sets, auxiliary outliers disjoint from all of them),
pre-train ``DigitsCNN`` with cross-entropy, then fine-tune a copy with the energy-bounded loss and
another with Outlier Exposure, both from the pre-trained weights with the ``builtin`` preset of
``ebood.train.presets``. Prints, per seed and averaged over the seeds, the mean FPR95 (ID positive,
as in the paper) and mean AUROC over the six OOD test sets, and the ID test accuracy, for:

    pre-trained + MSP, pre-trained + energy, OE fine-tuned + MSP, energy fine-tuned + energy

and the run time of each stage. The margins are the preset's; ``--margins suggest`` uses
``ebood.train.suggest_margins`` instead, ``--margins paper`` the paper's CIFAR-10 values (-23 / -5),
``--margins default`` the official code's argparse defaults (-25 / -7).

    python benchmarks/finetune_builtin.py                 # seed 0
    python benchmarks/finetune_builtin.py --seeds 0 1 2 3 4   # robustness over seeds
    python benchmarks/finetune_builtin.py --margins suggest   # margins from suggest_margins
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ebood import metrics, scores
from ebood.data.builtin import builtin_benchmark
from ebood.models import DigitsCNN
from ebood.train import (EnergyBoundedLoss, OutlierExposureLoss, finetune, get_preset, suggest_margins,
                         train_classifier)

ROWS = (("pretrained", "msp"), ("pretrained", "energy"), ("oe_finetuned", "msp"), ("energy_finetuned", "energy"))


def logits_of(model: torch.nn.Module, data: Any) -> torch.Tensor:
    """The model's logits on a whole dataset (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(batch[0]) for batch in DataLoader(data, batch_size=1024)])


def evaluate(model: torch.nn.Module, bm: Any, detector: str) -> dict[str, float]:
    """ID test accuracy, and FPR95 / AUROC of ``detector`` (``msp`` or ``energy``) per OOD set and on average."""
    score = getattr(scores, detector)
    id_logits = logits_of(model, bm.test)
    out: dict[str, float] = {"accuracy": float((id_logits.argmax(1) == bm.test.labels).float().mean())}
    id_scores = score(id_logits)
    for name, data in bm.ood.items():
        m = metrics.evaluate(id_scores, score(logits_of(model, data)))
        out[f"fpr95/{name}"], out[f"auroc/{name}"] = m["fpr95"], m["auroc"]
    out["fpr95"] = float(np.mean([out[f"fpr95/{k}"] for k in bm.ood]))
    out["auroc"] = float(np.mean([out[f"auroc/{k}"] for k in bm.ood]))
    return out


def run_seed(seed: int, args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, float], tuple]:
    preset = get_preset("builtin")
    if args.epochs is not None or args.lr is not None:
        preset = replace(preset, epochs=args.epochs or preset.epochs, lr=args.lr or preset.lr)
    times: dict[str, float] = {}
    t = time.perf_counter()
    bm = builtin_benchmark(seed)
    times["data"] = time.perf_counter() - t

    p = preset.pretrain
    torch.manual_seed(seed)  # the CNN's initial weights
    t = time.perf_counter()
    pretrained = train_classifier(DigitsCNN(num_classes=10), bm.train, epochs=p.epochs, lr=p.lr, optimizer=p.optimizer,
                                  batch_size=p.batch_size, weight_decay=p.weight_decay, seed=seed, progress=False)
    times["pre-training"] = time.perf_counter() - t

    energy = preset.loss_params("energy")
    if args.margins == "suggest":
        energy.update(suggest_margins(pretrained, bm.train, bm.auxiliary, seed=seed)._asdict())
    elif args.margins == "paper":
        energy.update(m_in=-23.0, m_out=-5.0)
    elif args.margins == "default":
        energy.update(m_in=-25.0, m_out=-7.0)
    margins = (energy["m_in"], energy["m_out"])
    models = {"pretrained": pretrained}
    for name, loss in (("energy_finetuned", EnergyBoundedLoss(**energy)),
                       ("oe_finetuned", OutlierExposureLoss(**preset.loss_params("oe")))):
        t = time.perf_counter()
        models[name] = finetune(copy.deepcopy(pretrained), bm.train, bm.auxiliary, loss, seed=seed, progress=False,
                                **preset.finetune_kwargs())
        times[name] = time.perf_counter() - t
    t = time.perf_counter()
    results = {f"{m}/{d}": evaluate(models[m], bm, d) for m, d in ROWS}
    times["evaluation"] = time.perf_counter() - t
    return results, times, margins


def print_table(title: str, results: dict[str, dict[str, float]], ood_names: list[str]) -> None:
    labels = {"pretrained/msp": "pre-trained + MSP", "pretrained/energy": "pre-trained + energy",
              "oe_finetuned/msp": "OE fine-tuned + MSP", "energy_finetuned/energy": "energy fine-tuned + energy"}
    print(f"\n{title}")
    head = f"| {'model + score':<28} | mean FPR95 % | mean AUROC % | ID acc % | " + " | ".join(ood_names) + " |"
    print(head)
    print("|" + "---|" * (4 + len(ood_names)))
    for key, label in labels.items():
        r = results[key]
        per_set = " | ".join(f"{100 * r[f'fpr95/{k}']:.2f}" for k in ood_names)
        print(f"| {label:<28} | {100 * r['fpr95']:12.2f} | {100 * r['auroc']:12.2f} | {100 * r['accuracy']:8.2f} | {per_set} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--margins", choices=("preset", "suggest", "paper", "default"), default="preset")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the preset's)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: an 8x8 CNN gains nothing from intra-op threads, and "
                         "on a shared machine they oversubscribe the cores: 193 s with 2 threads vs 41 s with 1 "
                         "for seed 0 on the 2-core machine of docs/training.md; 0 keeps torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"preset: {get_preset('builtin').description}; margins: {args.margins}")
    all_results, checks = [], []
    start = time.perf_counter()
    for seed in args.seeds:
        t = time.perf_counter()
        results, times, margins = run_seed(seed, args)
        total = time.perf_counter() - t
        bm_names = [k.split("/", 1)[1] for k in results["pretrained/msp"] if k.startswith("fpr95/")]
        print_table(f"seed {seed} (m_in = {margins[0]:.2f}, m_out = {margins[1]:.2f}); "
                    + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f"; total {total:.1f} s",
                    results, bm_names)
        all_results.append(results)
        acc0 = results["pretrained/msp"]["accuracy"]
        checks.append({
            "energy fine-tuning lowers energy FPR95": results["energy_finetuned/energy"]["fpr95"] < results["pretrained/energy"]["fpr95"],
            "energy fine-tuned accuracy within 1 point": results["energy_finetuned/energy"]["accuracy"] >= acc0 - 0.01,
            "OE lowers MSP FPR95": results["oe_finetuned/msp"]["fpr95"] < results["pretrained/msp"]["fpr95"],
            "OE accuracy within 1 point": results["oe_finetuned/msp"]["accuracy"] >= acc0 - 0.01,
        })
    if len(all_results) > 1:
        mean = {k: {m: float(np.mean([r[k][m] for r in all_results])) for m in all_results[0][k]} for k in all_results[0]}
        print_table(f"mean over seeds {args.seeds}", mean, bm_names)
    print(f"\nall seeds: {time.perf_counter() - start:.1f} s")
    for name in checks[0]:
        held = [c[name] for c in checks]
        print(f"{'OK  ' if all(held) else 'FAIL'} {name}: {sum(held)}/{len(held)} seeds")


if __name__ == "__main__":
    main()
