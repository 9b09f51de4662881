"""``ebood train`` (a classifier from scratch: cross-entropy, LogitNorm or PALM) and ``ebood finetune``
(energy-bounded / Outlier Exposure / LogitNorm).

Models are named as everywhere in ebood (``ebood.models.load_model``): a built-in architecture,
an entry point ``package.module:function`` or a TorchScript file, plus optional ``--checkpoint``
weights. Data are dataset specs (``ebood.data.open_dataset``): ``builtin:NAME``, ``cifar10:train``,
``folder:PATH``, ``array:FILE.npz`` ... The result is a safetensors state dict (``-o``) that
``--checkpoint`` of any ebood command accepts.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from ..train.presets import PRESETS, available_presets
from ..train.classifier import train_classifier
from ..train.finetune import LOSSES
from ._app import app, command, fail  # noqa: F401
from ._help import DATA_SPEC_HELP, MODEL_HELP, check_choice, one_of

_MODEL_HELP = MODEL_HELP
_DATA_HELP = DATA_SPEC_HELP + "."
#: train_classifier's optimizers, from its signature.
OPTIMIZERS: tuple[str, ...] = typing.get_args(typing.get_type_hints(train_classifier)["optimizer"])
_PRESET_HELP = "A recipe of ebood.train.PRESETS: " + one_of(available_presets())


def _device(device: Optional[str]) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(spec: str, checkpoint: Optional[Path], num_classes: Optional[int], extra: dict[str, Any] | None = None):
    from ..models import load_model

    kwargs = dict(extra or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return load_model(spec, checkpoint, **kwargs)


def _open(spec: str, root: Optional[Path], options: dict[str, Any] | None = None):
    from ..data import open_dataset

    return open_dataset(spec, root=root, **(options or {}))


def _floats(text: Optional[str], name: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{name} must be comma-separated numbers (one per channel), got {text!r}")


def _data_options(mean: Optional[str], std: Optional[str], image_size: Optional[int],
                  defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """open_dataset keyword arguments: a preset's, overridden by the options given."""
    opts = dict(defaults or {})
    m, s = _floats(mean, "--mean"), _floats(std, "--std")
    if (m is None) != (s is None) and "mean" not in opts:
        fail("give --mean and --std together")
    if m is not None:
        opts["mean"] = m
    if s is not None:
        opts["std"] = s
    if image_size is not None:
        opts["image_size"] = image_size
    return opts


def _augmentation(augment: bool, data: dict[str, Any]):
    from ..train import RandomCropFlip

    if not augment:
        return None
    if "mean" in data:
        return RandomCropFlip.for_normalized(data["mean"], data["std"], padding=4)
    return RandomCropFlip(padding=4)


_MEAN_HELP = "Normalise inputs as (x - mean) / std: per-channel values, comma-separated (e.g. 0.491,0.482,0.447)."
_AUGMENT_HELP = "Random crops (4-pixel black padding) and horizontal flips of every batch (the CIFAR recipe)."


def _check_output(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        fail(f"{path}: the output is a safetensors state dict; give a file name ending in .safetensors")
    if not path.parent.exists():
        fail(f"{path.parent}: no such directory")
    from ..io import check_writable

    check_writable(path)  # before training, not after it


def _history_table(history: list[Any], outliers: bool):
    from rich.table import Table

    table = Table(title="training", box=None, pad_edge=False)
    cols = ["epoch", "loss", "CE"] + (["in", "out", "E_in", "E_out"] if outliers else []) + ["acc%", "val%", "s"]
    for c in cols:
        table.add_column(c, justify="right", no_wrap=True)
    for m in history:
        row = [str(m.epoch), f"{m.loss:.4g}", f"{m.ce:.4g}"]
        if outliers:
            row += [f"{m.in_term:.4g}", f"{m.out_term:.4g}", f"{m.energy_in:.2f}", f"{m.energy_out:.2f}"]
        row += [f"{100 * m.accuracy:.2f}", "-" if m.val_accuracy is None else f"{100 * m.val_accuracy:.2f}",
                f"{m.seconds:.1f}"]
        table.add_row(*row)
    return table


def _run_training(fn, output: Path, info: dict[str, Any], outliers: bool, **kwargs: Any) -> None:
    """Run ``fn`` (finetune / train_classifier) writing ``output``, print the epochs; errors in one line."""
    from rich.console import Console

    from ..runtime import ModelInputError
    from ..train import NonFiniteLossError, TrainingInterrupted

    history: list[Any] = []
    try:
        fn(on_epoch=history.append, output=output, info=info, **kwargs)
    except TrainingInterrupted as exc:
        typer.echo(f"ebood: {exc}", err=True)
        raise typer.Exit(130) from None
    except NonFiniteLossError as exc:
        fail(str(exc))
    except ModelInputError as exc:  # name the model and the data the user gave
        data = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in info.items() if k in ("data", "id_data", "outlier_data"))
        fail(f"model {info['model']} on {data}: {exc}")
    Console().print(_history_table(history, outliers))
    typer.echo(f"wrote {output}")


_TRAIN_DEFAULTS = {n: q.default for n, q in inspect.signature(train_classifier).parameters.items()}


#: the training settings printed when a preset chose them
_TRAIN_SHOWN = ("epochs", "optimizer", "lr", "batch_size", "weight_decay")


def _default(name: str) -> str:
    return f"default: the preset's recipe, else {_TRAIN_DEFAULTS[name]}"


def _training_preset(name: Optional[str], model: Optional[str]) -> Any:
    """The preset named ``name``; else the one that trains ``model`` from scratch (None if there is none)."""
    from ..train import get_preset

    if name is not None:
        return get_preset(name)
    return next((p for p in PRESETS.values() if model is not None and p.model == model and p.pretrain is not None), None)


@command("train")
def train_command(
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the trained weights (.safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP + " Default: the preset's."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Labelled training data. " + _DATA_HELP + " Default: the preset's."),
    preset: Optional[str] = typer.Option(None, "--preset", help=_PRESET_HELP + ". Default: the preset of --model when it has a training recipe (options given explicitly win)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Initial weights (.safetensors / .pt state dict)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classes of a built-in architecture."),
    validation: Optional[str] = typer.Option(None, "--validation", help="Labelled data whose accuracy is shown after each epoch."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder that holds named datasets (cifar10, svhn, ...)."),
    mean: Optional[str] = typer.Option(None, "--mean", help=_MEAN_HELP),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel standard deviations for --mean."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize and centre-crop images to this size."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help=_AUGMENT_HELP + " Default: the preset's."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Epochs ({_default('epochs')})."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Initial learning rate, cosine-annealed per step ({_default('lr')})."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Samples per step ({_default('batch_size')})."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help=f"{one_of(OPTIMIZERS)} (sgd: Nesterov momentum 0.9; {_default('optimizer')})."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=f"L2 weight decay ({_default('weight_decay')})."),
    seed: int = typer.Option(0, "--seed", help="Seeds the initial weights, the data order and dropout."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Save a resumable checkpoint here after each epoch."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a checkpoint folder (or the latest in a folder)."),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader worker processes."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (on a terminal)."),
    loss: str = typer.Option("ce", "--loss", help="ce (cross-entropy), logitnorm (Wei et al. 2022) or palm (mixture of prototypes, Lu et al. 2024)."),
    tau: float = typer.Option(0.04, "--tau", help="LogitNorm temperature: logits are scaled to norm 1/tau."),
    cache_size: int = typer.Option(6, "--cache-size", help="PALM: prototypes per class."),
    top_k: int = typer.Option(5, "--k", help="PALM: prototypes kept per sample after Sinkhorn (0: all)."),
    proto_m: float = typer.Option(0.999, "--proto-m", help="PALM: EMA momentum of the prototypes."),
    temp: float = typer.Option(0.1, "--temp", help="PALM: temperature of the MLE loss."),
    lambda_pcon: float = typer.Option(1.0, "--lambda-pcon", help="PALM: weight of the prototype contrastive loss."),
    epsilon: float = typer.Option(0.05, "--epsilon", help="PALM: Sinkhorn-Knopp entropy regularisation."),
    feat_dim: int = typer.Option(128, "--feat-dim", help="PALM: embedding dimension of the projection head."),
) -> None:
    """Train a classifier from scratch: cross-entropy, LogitNorm, or PALM (score it with knn / mahalanobis); a built-in model gets its preset's recipe."""
    import dataclasses

    from ..train import LogitNormLoss

    if loss not in ("ce", "logitnorm", "palm"):
        fail(f"unknown loss {loss!r}; choose ce, logitnorm or palm")
    p = _training_preset(preset, model)
    model = _pick(model, p and p.model)
    data = _pick(data, p and p.id_data)
    if model is None or data is None:
        fail("give --model and --data (or a --preset that names them)")
    if optimizer is not None:
        check_choice(optimizer, OPTIMIZERS, "--optimizer")
    _check_output(output)
    recipe = dataclasses.asdict(p.pretrain) if p is not None and p.pretrain is not None else {}
    settings = {k: _pick(v, recipe.get(k)) for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size,
                                                            optimizer=optimizer, weight_decay=weight_decay).items()}
    settings = {k: v for k, v in settings.items() if v is not None}
    if p is not None and loss != "palm":
        shown = {k: settings.get(k, _TRAIN_DEFAULTS[k]) for k in _TRAIN_SHOWN}
        source = "recipe" if recipe else "data (and train_classifier's defaults)"
        typer.echo(f"training {model} with the {p.name} preset's {source}: "
                   + ", ".join(f"{k} {v}" for k, v in shown.items()), err=True)
    data_opts = _data_options(mean, std, image_size, p.data_options() if p is not None else None)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights, reproducible from --seed
        net = _load_model(model, checkpoint, _pick(num_classes, p and p.num_classes))
    if loss == "palm":
        if checkpoint_dir is not None or resume is not None:
            fail("--checkpoint-dir / --resume are not available with --loss palm")
        params = dict(cache_size=cache_size, k=top_k, proto_m=proto_m, temp=temp, lambda_pcon=lambda_pcon, epsilon=epsilon,
                      feat_dim=feat_dim)
        explicit = dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay)
        _run_palm(net, output, params, data=_open(data, root, data_opts), seed=seed, device=_device(device), progress=progress,
                  augment=_augmentation(bool(p and p.augment) if augment is None else augment, data_opts),
                  **{k: v for k, v in explicit.items() if v is not None})  # PALM's own schedule unless given
        return
    _run_training(
        train_classifier, output,
        {"command": "train", "model": model, "checkpoint": None if checkpoint is None else str(checkpoint), "data": data,
         "preset": None if p is None else p.name},
        outliers=False, model=net, data=_open(data, root, data_opts), seed=seed, device=_device(device),
        checkpoint_dir=checkpoint_dir, resume=resume, num_workers=num_workers, progress=progress,
        augment=_augmentation(bool(p and p.augment) if augment is None else augment, data_opts),
        validation=None if validation is None else _open(validation, root, data_opts),
        loss=LogitNormLoss(tau) if loss == "logitnorm" else None, **settings,
    )


def _run_palm(net: Any, output: Path, params: dict[str, Any], **kwargs: Any) -> None:
    """PALM training of ``net``'s penultimate features; prints the epochs, errors in one line."""
    from rich.console import Console
    from rich.table import Table
    from torch import nn

    from ..train import PALMLoss, train_palm

    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        fail(f"{type(net).__name__} has no nn.Linear head: PALM trains the input of the last one")
    history: list[Any] = []
    try:
        objective = PALMLoss(linears[-1].out_features, seed=kwargs["seed"], **params)
        train_palm(net, loss=objective, output=output, on_epoch=history.append, **kwargs)
    except (ValueError, FloatingPointError) as exc:
        fail(str(exc))
    table = Table(title="PALM training", box=None, pad_edge=False)
    for c in ("epoch", "loss", "MLE", "PCON", "s"):
        table.add_column(c, justify="right")
    for m in history:
        table.add_row(str(m.epoch), f"{m.loss:.4g}", f"{m.mle:.4g}", f"{m.proto_contra:.4g}", f"{m.seconds:.1f}")
    Console().print(table)
    typer.echo(f"wrote {output} (score its penultimate features with knn or mahalanobis)")


def _pick(value: Any, preset_value: Any) -> Any:
    return preset_value if value is None else value


@command("finetune", renamed={"--id": ["--data"]})
def finetune_command(
    outliers: str = typer.Option(..., "--outliers", help="Auxiliary outliers, disjoint from every OOD test set. " + _DATA_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the fine-tuned weights (.safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP + " Default: the preset's."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The pre-trained weights (.safetensors / .pt state dict)."),
    id_data: Optional[str] = typer.Option(None, "--data", "-d", help="Labelled in-distribution training data. " + _DATA_HELP + " Default: the preset's."),
    loss: str = typer.Option("energy", "--loss", help=one_of(sorted(LOSSES)) + " (energy: energy-bounded, Liu et al. 2020; oe: Outlier Exposure)."),
    preset: Optional[str] = typer.Option(None, "--preset", help=_PRESET_HELP + " (options given explicitly win)."),
    m_in: Optional[float] = typer.Option(None, "--m-in", help="Energy margin for ID data (default: preset, or -25)."),
    m_out: Optional[float] = typer.Option(None, "--m-out", help="Energy margin for outliers (default: preset, or -7)."),
    suggest: bool = typer.Option(False, "--suggest-margins", help="Derive unset margins from the pre-trained model's energies (ebood.train.suggest_margins)."),
    weight: Optional[float] = typer.Option(None, "--weight", help="Weight of the outlier terms (default 0.1 energy, 0.5 oe)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Energy temperature T."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classes of a built-in architecture."),
    validation: Optional[str] = typer.Option(None, "--validation", help="Labelled data whose accuracy is shown after each epoch."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder that holds named datasets (cifar10, svhn, ...)."),
    mean: Optional[str] = typer.Option(None, "--mean", help=_MEAN_HELP + " Default: the preset's."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel standard deviations for --mean."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize and centre-crop images to this size (default: the preset's)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help=_AUGMENT_HELP + " Default: the preset's."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default 10)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Initial learning rate, cosine-annealed per step to --lr-min (default 1e-3)."),
    lr_min: Optional[float] = typer.Option(None, "--lr-min", help="Final learning rate (default 1e-6)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Default 5e-4."),
    id_batch_size: Optional[int] = typer.Option(None, "--id-batch-size", help="ID samples per step (default 128)."),
    outlier_batch_size: Optional[int] = typer.Option(None, "--outlier-batch-size", help="Outliers per step (default 256)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the data order and dropout."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Save a resumable checkpoint here after each epoch."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a checkpoint folder (or the latest in a folder)."),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader worker processes."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (on a terminal)."),
) -> None:
    """Fine-tune a pre-trained classifier with auxiliary outliers (energy-bounded loss or Outlier Exposure)."""
    from ..train import finetune, get_preset, make_loss, suggest_margins

    check_choice(loss, sorted(LOSSES), "--loss")
    p = get_preset(preset) if preset is not None else None
    model = _pick(model, p and p.model)
    id_data = _pick(id_data, p and p.id_data)
    if model is None or id_data is None:
        fail("give --model and --data (or a --preset that names them)")
    if loss == "oe" and (m_in is not None or m_out is not None or suggest):
        fail("--m-in, --m-out and --suggest-margins apply to --loss energy only")
    _check_output(output)
    recipe = p.finetune_kwargs() if p is not None else {}
    settings = {k: _pick(v, recipe.get(k)) for k, v in dict(epochs=epochs, lr=lr, lr_min=lr_min,
                                                            weight_decay=weight_decay, id_batch_size=id_batch_size,
                                                            outlier_batch_size=outlier_batch_size).items()}
    settings = {k: v for k, v in settings.items() if v is not None}
    dev = _device(device)
    net = _load_model(model, checkpoint, _pick(num_classes, p and p.num_classes))
    data_opts = _data_options(mean, std, image_size, p.data_options() if p is not None else None)
    id_set, outlier_set = _open(id_data, root, data_opts), _open(outliers, root, data_opts)
    augmentation = _augmentation(bool(p and p.augment) if augment is None else augment, data_opts)

    params: dict[str, Any] = p.loss_params(loss) if p is not None else {}
    if weight is not None:
        params["weight"] = weight
    if loss == "energy":
        params["temperature"] = temperature
        explicit = {k: v for k, v in (("m_in", m_in), ("m_out", m_out)) if v is not None}
        missing = {"m_in", "m_out"} - set(explicit)
        if suggest and missing:
            suggested = suggest_margins(net, id_set, outlier_set, temperature=temperature, seed=seed,
                                        device=dev)._asdict()
            params.update({k: round(suggested[k], 3) for k in missing})
        params.update(explicit)
    objective = make_loss(loss, **params)
    typer.echo(f"fine-tuning {model} with {objective!r}", err=True)
    _run_training(
        finetune, output,
        {"command": "finetune", "model": model, "checkpoint": None if checkpoint is None else str(checkpoint),
         "id_data": id_data, "outlier_data": outliers, "preset": preset},
        outliers=True, model=net, id_data=id_set, outlier_data=outlier_set, loss=objective, seed=seed,
        device=dev, checkpoint_dir=checkpoint_dir, resume=resume, num_workers=num_workers, progress=progress,
        augment=augmentation, validation=None if validation is None else _open(validation, root, data_opts),
        **settings,
    )
