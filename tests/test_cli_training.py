"""`ebood train` and `ebood finetune`: the options reach the library, outputs load, errors are one line."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import run
from safetensors import safe_open

from ebood.data import open_dataset
from ebood.models import load_model
from ebood.train import EnergyBoundedLoss, finetune, suggest_margins

pytestmark = pytest.mark.usefixtures("one_thread")


def record(path):
    """The training record in the ebood header of a weights file."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ebood"])["training"]


def assert_error(res, code, *fragments):
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), f"crashed: {res.exception!r}"
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("ebood:"), res.output
    assert "Traceback" not in res.output
    for fragment in fragments:
        assert fragment in last, res.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny digits-like data: 10 classes of 1x8x8 images, and outlier noise with labels -1."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    protos = rng.random((10, 1, 8, 8)).astype(np.float32)
    y = np.arange(160) % 10
    x = np.clip(protos[y] + 0.1 * rng.standard_normal((160, 1, 8, 8)), 0, 1).astype(np.float32)
    np.savez(d / "train.npz", inputs=x, labels=y)
    xo = rng.random((100, 1, 8, 8)).astype(np.float32)
    np.savez(d / "outliers.npz", inputs=xo, labels=-np.ones(100, dtype=np.int64))
    return d


@pytest.fixture(scope="module")
def pretrained(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "digits.safetensors"
    res = run("train", "--model", "digits_cnn", "--data", f"array:{files / 'train.npz'}", "--epochs", 5,
              "--lr", 0.01, "--optimizer", "adam", "--batch-size", 32, "--validation", f"array:{files / 'train.npz'}",
              "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    return out


def test_train_writes_loadable_weights_that_learned(files, pretrained):
    h = record(pretrained)
    s = h["settings"]
    assert s["info"]["command"] == "train" and s["optimizer"] == "adam" and s["epochs"] == 5
    assert [e["epoch"] for e in h["history"]] == [1, 2, 3, 4, 5]
    model = load_model("digits_cnn", pretrained)
    data = np.load(files / "train.npz")
    with torch.no_grad():
        acc = (model(torch.from_numpy(data["inputs"])).argmax(1).numpy() == data["labels"]).mean()
    assert acc > 0.9  # ten well-separated prototypes


def test_train_is_reproducible_from_the_seed(files, tmp_path):
    def train(seed, name):
        res = run("train", "--model", "digits_cnn", "--data", f"array:{files / 'train.npz'}", "--epochs", 1,
                  "--seed", seed, "-o", tmp_path / name, "--no-progress")
        assert res.exit_code == 0, res.output
        return load_model("digits_cnn", tmp_path / name).state_dict()

    a, b, c = train(1, "a.safetensors"), train(1, "b.safetensors"), train(2, "c.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_finetune_cli_equals_the_library_call(files, pretrained, tmp_path):
    out = tmp_path / "ft.safetensors"
    res = run("finetune", "--model", "digits_cnn", "--checkpoint", pretrained, "--data", f"array:{files / 'train.npz'}",
              "--outliers", f"array:{files / 'outliers.npz'}", "--loss", "energy", "--m-in", -9, "--m-out", -2,
              "--weight", 0.2, "--epochs", 2, "--lr", 0.01, "--id-batch-size", 32, "--outlier-batch-size", 40,
              "--seed", 3, "--device", "cpu", "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "E_in" in res.output and f"wrote {out}" in res.output
    expected = finetune(load_model("digits_cnn", pretrained), open_dataset(f"array:{files / 'train.npz'}"),
                        open_dataset(f"array:{files / 'outliers.npz'}"), EnergyBoundedLoss(-9, -2, 0.2), epochs=2,
                        lr=0.01, id_batch_size=32, outlier_batch_size=40, seed=3, progress=False)
    got = load_model("digits_cnn", out)
    for (k, a), (_, b) in zip(expected.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k
    s = record(out)["settings"]
    assert s["info"]["model"] == "digits_cnn" and s["info"]["checkpoint"] == str(pretrained)
    assert s["loss"] == {"loss": "energy", "m_in": -9.0, "m_out": -2.0, "weight": 0.2, "temperature": 1.0}


def test_suggest_margins_option(files, pretrained, tmp_path):
    out = tmp_path / "ft.safetensors"
    res = run("finetune", "--model", "digits_cnn", "--checkpoint", pretrained, "--data", f"array:{files / 'train.npz'}",
              "--outliers", f"array:{files / 'outliers.npz'}", "--suggest-margins", "--m-out", -1.5, "--epochs", 1,
              "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    m = suggest_margins(load_model("digits_cnn", pretrained), open_dataset(f"array:{files / 'train.npz'}"),
                        open_dataset(f"array:{files / 'outliers.npz'}"))
    loss = record(out)["settings"]["loss"]
    assert loss["m_in"] == pytest.approx(m.m_in, abs=1e-3)
    assert loss["m_out"] == -1.5  # given explicitly: not replaced


SEEN = []


class TinyCifarNet(torch.nn.Module):
    """A 3x32x32 classifier small enough for a test, recording the batches it is given."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, num_classes)

    def forward(self, x):
        SEEN.append(x.detach().clone())
        return self.fc(x.flatten(1))


def tiny_cifar_net(num_classes=10):
    return TinyCifarNet(num_classes)


def test_preset_fills_the_recipe_and_explicit_options_win(files, tmp_path):
    from ebood.train import get_preset

    out = tmp_path / "ft.safetensors"
    res = run("finetune", "--preset", "cifar10", "--model", "test_cli_training:tiny_cifar_net",
              "--data", f"array:{files / 'train.npz'}", "--outliers", f"array:{files / 'outliers.npz'}",
              "--epochs", 1, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    s = record(out)["settings"]
    assert s["loss"]["m_in"] == -23.0 and s["loss"]["m_out"] == -5.0 and s["loss"]["weight"] == 0.1
    assert (s["epochs"], s["lr"], s["lr_min"], s["id_batch_size"], s["outlier_batch_size"]) == (1, 1e-3, 1e-6, 128, 256)
    assert (s["momentum"], s["nesterov"], s["weight_decay"]) == (0.9, True, 5e-4)
    # the recipe's data handling: normalised 3x32x32 images, crops padded with black, flips
    mean, std = np.array(get_preset("cifar10").mean), np.array(get_preset("cifar10").std)
    assert s["augment"]["padding"] == 4 and s["augment"]["flip"] is True
    np.testing.assert_allclose(s["augment"]["fill"], -mean / std)
    batch = SEEN[-1]  # the last step: 32 ID images + 256 outliers, normalised and augmented
    assert batch.shape == (32 + 256, 3, 32, 32)
    black = torch.tensor(-mean / std, dtype=torch.float32)
    assert torch.isclose(batch.amin(dim=(0, 2, 3)), black, atol=1e-5).all()  # pixels 0 or padding
    assert (batch.amax(dim=(0, 2, 3)) > 1.5).all()  # normalised, not [0, 1]
    assert s["info"]["preset"] == "cifar10"
    res = run("finetune", "--preset", "cifar10", "--loss", "oe", "--no-augment", "--model",
              "test_cli_training:tiny_cifar_net", "--data", f"array:{files / 'train.npz'}",
              "--outliers", f"array:{files / 'outliers.npz'}", "--epochs", 1, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    s = record(out)["settings"]
    assert s["loss"] == {"loss": "oe", "weight": 0.5} and s["augment"] is None


def test_checkpoint_dir_and_resume(files, pretrained, tmp_path):
    common = ["--model", "digits_cnn", "--checkpoint", pretrained, "--data", f"array:{files / 'train.npz'}",
              "--outliers", f"array:{files / 'outliers.npz'}", "--epochs", 2, "--m-in", -9, "--m-out", -2,
              "--no-progress"]
    res = run("finetune", *common, "--checkpoint-dir", tmp_path / "ck", "-o", tmp_path / "a.safetensors")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["epoch-001", "epoch-002"]
    res = run("finetune", *common, "--resume", tmp_path / "ck" / "epoch-001", "-o", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res.output
    a, b = load_model("digits_cnn", tmp_path / "a.safetensors"), load_model("digits_cnn", tmp_path / "b.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # a checkpoint folder is itself a --checkpoint for the other commands
    load_model("digits_cnn", tmp_path / "ck" / "epoch-002")


def test_non_finite_loss_is_a_one_line_error(files, pretrained, tmp_path):
    # a learning rate of 1e12 makes the weights, then the loss, overflow within a few steps
    res = run("finetune", "--model", "digits_cnn", "--checkpoint", pretrained, "--data", f"array:{files / 'train.npz'}",
              "--outliers", f"array:{files / 'outliers.npz'}", "--m-in", -9, "--m-out", -2, "--epochs", 3,
              "--lr", 1e12, "--checkpoint-dir", tmp_path / "ck", "-o", tmp_path / "x.safetensors", "--no-progress")
    assert_error(res, 2, "non-finite loss at step ", "(epoch 1, step ")
    assert not (tmp_path / "x.safetensors").exists()


def test_interrupt_exits_130_naming_the_checkpoint(files, pretrained, tmp_path, monkeypatch):
    import ebood.train

    def interrupted(*a, **k):
        raise ebood.train.TrainingInterrupted("training interrupted in epoch 2; last checkpoint: ck/epoch-001",
                                              2, 5, None)

    monkeypatch.setattr(ebood.train, "finetune", interrupted)
    res = run("finetune", "--model", "digits_cnn", "--data", f"array:{files / 'train.npz'}",
              "--outliers", f"array:{files / 'outliers.npz'}", "-o", tmp_path / "x.safetensors", "--no-progress")
    assert_error(res, 130, "last checkpoint: ck/epoch-001")


@pytest.mark.parametrize("args, fragment", [
    (["--loss", "nope"], "got 'nope'"),  # the list of losses comes from ebood.train.finetune.LOSSES
    (["--loss", "oe", "--m-in", "-3"], "apply to --loss energy only"),
    (["--preset", "imagenet"], "unknown fine-tuning preset 'imagenet'"),
    (["-o", "weights.pt"], "ending in .safetensors"),
    (["--model", "no_such_net"], "unknown model"),
    (["--weight", "-1"], "weight must be"),
    (["--epochs", "0"], "epochs must be"),
])
def test_bad_options_are_one_line_errors(files, tmp_path, args, fragment):
    base = {"--model": "digits_cnn", "--data": f"array:{files / 'train.npz'}",
            "--outliers": f"array:{files / 'outliers.npz'}", "-o": str(tmp_path / "x.safetensors")}
    for flag in list(base):
        if flag in args:
            del base[flag]
    flat = [a for kv in base.items() for a in kv]
    assert_error(run("finetune", *flat, *args, "--no-progress"), 2, fragment)


def test_finetune_needs_model_and_id_without_preset(files, tmp_path):
    assert_error(run("finetune", "--outliers", f"array:{files / 'outliers.npz'}", "-o", tmp_path / "x.safetensors"),
                 2, "give --model and --data")


def test_train_bad_data_spec(tmp_path):
    res = run("train", "--model", "digits_cnn", "--data", "nosuchkind:abc", "-o", tmp_path / "x.safetensors")
    assert_error(res, 2)


def test_train_defaults_are_the_builtin_presets_recipe(tmp_path):
    from ebood.train import get_preset

    recipe = get_preset("builtin").pretrain  # the recipe the built-in benchmark trains DigitsCNN with
    res = run("train", "--model", "digits_cnn", "--epochs", 1, "-o", tmp_path / "d.safetensors", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "with the builtin preset's recipe" in res.output
    s = record(tmp_path / "d.safetensors")["settings"]
    assert (s["optimizer"], s["lr"], s["id_batch_size"], s["weight_decay"]) == (
        recipe.optimizer, recipe.lr, recipe.batch_size, recipe.weight_decay)
    assert s["epochs"] == 1  # an option given explicitly wins
    assert s["info"]["data"] == get_preset("builtin").id_data and s["info"]["preset"] == "builtin"
    assert recipe.epochs < 100  # not train_classifier's 100-epoch CIFAR default


def test_train_with_logitnorm_and_palm_losses(files, tmp_path):
    out = tmp_path / "logitnorm.safetensors"
    res = run("train", "--model", "digits_cnn", "--data", f"array:{files / 'train.npz'}", "--epochs", 3, "--lr", 0.01,
              "--optimizer", "adam", "--batch-size", 32, "--loss", "logitnorm", "--tau", 0.05, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert record(out)["settings"]["loss"] == {"loss": "logitnorm", "tau": 0.05}
    out = tmp_path / "palm.safetensors"
    res = run("train", "--model", "digits_cnn", "--data", f"array:{files / 'train.npz'}", "--epochs", 2, "--lr", 0.01,
              "--optimizer", "adam", "--batch-size", 64, "--loss", "palm", "--cache-size", 2, "--k", 1, "--feat-dim", 16,
              "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    s = record(out)["settings"]
    assert s["kind"] == "palm" and s["loss"]["cache_size"] == 2 and s["loss"]["k"] == 1 and s["loss"]["feat_dim"] == 16
    assert [e["epoch"] for e in record(out)["history"]] == [1, 2]
    load_model("digits_cnn", out)
    assert_error(run("train", "--model", "digits_cnn", "--data", f"array:{files / 'train.npz'}", "--loss", "hinge",
                     "-o", tmp_path / "x.safetensors"), 2, "unknown loss 'hinge'")
