"""``ebood train`` (a classifier from scratch) and ``ebood finetune`` (energy-bounded / Outlier Exposure).

Models are named as everywhere in ebood (``ebood.models.load_model``): a built-in architecture,
an entry point ``package.module:function`` or a TorchScript file, plus optional ``--checkpoint``
weights. Data are dataset specs (``ebood.data.open_dataset``): ``builtin:NAME``, ``cifar10:train``,
``folder:PATH``, ``array:FILE.npz`` ... The result is a safetensors state dict (``-o``) that
``--checkpoint`` of any ebood command accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ._app import app, command, fail  # noqa: F401

_MODEL_HELP = "Model: a built-in name (digits_cnn, wrn40_2, resnet18_cifar), an entry point package.module:function, or a TorchScript file."
_DATA_HELP = "Dataset spec: builtin:NAME, cifar10:train, cifar100:train, svhn:train, mnist:train, folder:PATH, array:FILE.npz ..."


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


@command("train")
def train_command(
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    data: str = typer.Option(..., "--data", help="Labelled training data. " + _DATA_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the trained weights (.safetensors)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Initial weights (.safetensors / .pt state dict)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classes of a built-in architecture."),
    validation: Optional[str] = typer.Option(None, "--validation", help="Labelled data whose accuracy is shown after each epoch."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder that holds named datasets (cifar10, svhn, ...)."),
    mean: Optional[str] = typer.Option(None, "--mean", help=_MEAN_HELP),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel standard deviations for --mean."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize and centre-crop images to this size."),
    augment: bool = typer.Option(False, "--augment/--no-augment", help=_AUGMENT_HELP),
    epochs: int = typer.Option(100, "--epochs", help="Epochs."),
    lr: float = typer.Option(0.1, "--lr", help="Initial learning rate (cosine-annealed per step)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Samples per step."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (Nesterov momentum 0.9) or adam."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    seed: int = typer.Option(0, "--seed", help="Seeds the initial weights, the data order and dropout."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Save a resumable checkpoint here after each epoch."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a checkpoint folder (or the latest in a folder)."),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader worker processes."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (on a terminal)."),
) -> None:
    """Train a classifier from scratch with cross-entropy."""
    from ..train import train_classifier

    _check_output(output)
    data_opts = _data_options(mean, std, image_size)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights, reproducible from --seed
        net = _load_model(model, checkpoint, num_classes)
    _run_training(
        train_classifier, output,
        {"command": "train", "model": model, "checkpoint": None if checkpoint is None else str(checkpoint), "data": data},
        outliers=False, model=net, data=_open(data, root, data_opts), epochs=epochs, lr=lr, batch_size=batch_size,
        optimizer=optimizer, weight_decay=weight_decay, seed=seed, device=_device(device),
        checkpoint_dir=checkpoint_dir, resume=resume, num_workers=num_workers, progress=progress,
        augment=_augmentation(augment, data_opts),
        validation=None if validation is None else _open(validation, root, data_opts),
    )


def _pick(value: Any, preset_value: Any) -> Any:
    return preset_value if value is None else value


@command("finetune")
def finetune_command(
    outliers: str = typer.Option(..., "--outliers", help="Auxiliary outliers, disjoint from every OOD test set. " + _DATA_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the fine-tuned weights (.safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP + " Default: the preset's."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The pre-trained weights (.safetensors / .pt state dict)."),
    id_data: Optional[str] = typer.Option(None, "--id", help="Labelled in-distribution training data. Default: the preset's."),
    loss: str = typer.Option("energy", "--loss", help="energy (energy-bounded, Liu et al. 2020) or oe (Outlier Exposure)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="The paper's recipe: cifar10 or cifar100 (options given explicitly win)."),
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

    if loss not in ("energy", "oe"):
        fail(f"unknown loss {loss!r}; choose energy or oe")
    p = get_preset(preset) if preset is not None else None
    model = _pick(model, p and p.model)
    id_data = _pick(id_data, p and p.id_data)
    if model is None or id_data is None:
        fail("give --model and --id (or a --preset that names them)")
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
