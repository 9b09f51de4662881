"""ebood.train.finetune / train_classifier: the recipe, determinism, checkpoints, resume, stops, margins."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.special import logsumexp
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ebood.train import (EnergyBoundedLoss, NonFiniteLossError, OutlierExposureLoss, RandomCropFlip,
                         TrainingInterrupted, finetune, load_checkpoint, margins_from_energies, suggest_margins,
                         train_classifier)
from ebood.train.batches import OutlierSource

N_CLASSES, DIM = 3, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, dropout=0.3, bn=True, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [nn.Linear(DIM, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Dropout(dropout),
                                                                           nn.Linear(16, N_CLASSES)]
    return nn.Sequential(*layers).to(dtype)


def id_data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % N_CLASSES
    centres = torch.randn(N_CLASSES, DIM, generator=g) * 3
    return centres[y] + torch.randn(n, DIM, generator=g), y


def outliers(n=90, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, DIM, generator=g) * 16 - 8


FAST = dict(epochs=3, id_batch_size=32, outlier_batch_size=48, progress=False)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------- the recipe ----------

def test_two_full_batch_steps_match_a_hand_written_nesterov_sgd():
    # Full batches and a model without BatchNorm / dropout make the loss independent of the sample
    # order, so a plain reference loop (independent of ebood's batching) must give the same weights.
    x, y = id_data(30)
    xo = outliers(20)
    model = tiny_model(bn=False, dropout=0.0, dtype=torch.float64)
    ref = {k: v.clone() for k, v in model.named_parameters()}
    m_in, m_out, w, lr, wd, mom, lr_min, steps = -6.0, -1.0, 0.1, 0.05, 5e-4, 0.9, 1e-6, 2
    finetune(model, (x, y), xo, EnergyBoundedLoss(m_in, m_out, w), epochs=steps, lr=lr, lr_min=lr_min,
             weight_decay=wd, id_batch_size=30, outlier_batch_size=20, progress=False)

    params = {k: v.clone().requires_grad_() for k, v in ref.items()}
    bufs = {}

    def forward(inp):
        h = torch.relu(inp @ params["0.weight"].T + params["0.bias"])
        return h @ params["3.weight"].T + params["3.bias"]

    for k in range(steps):
        lr_k = lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * k / steps))
        z_in, z_out = forward(x.double()), forward(xo.double())
        e_in, e_out = -torch.logsumexp(z_in, 1), -torch.logsumexp(z_out, 1)
        total = (nn.functional.cross_entropy(z_in, y)
                 + w * ((e_in - m_in).clamp_min(0) ** 2).mean() + w * ((m_out - e_out).clamp_min(0) ** 2).mean())
        grads = torch.autograd.grad(total, list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads):
                g = g + wd * p
                bufs[name] = g.clone() if name not in bufs else mom * bufs[name] + g
                p -= lr_k * (g + mom * bufs[name])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[name].detach(), rtol=1e-10, atol=1e-12)


def test_learning_rate_is_cosine_annealed_per_step():
    x, y = id_data()
    seen = []
    finetune(tiny_model(), (x, y), outliers(), "energy", lr=0.01, on_step=lambda s: seen.append(s.lr), **FAST)
    total = 3 * math.ceil(120 / 32)
    expected = [1e-6 + (0.01 - 1e-6) * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


def test_energy_finetuning_separates_id_and_outlier_energies():
    x, y = id_data()
    xo = outliers()
    model = train_classifier(tiny_model(), (x, y), epochs=10, lr=0.05, batch_size=32, progress=False)

    def gap(m):
        with torch.no_grad():
            return float((-torch.logsumexp(m(xo), 1)).mean() - (-torch.logsumexp(m(x), 1)).mean())

    before = gap(model)
    metrics = []
    finetune(model, (x, y), xo, EnergyBoundedLoss(m_in=-8.0, m_out=-2.0), lr=0.05, epochs=10, id_batch_size=32,
             outlier_batch_size=48, progress=False, on_epoch=metrics.append)
    assert gap(model) > before + 2.0
    first, last = metrics[0], metrics[-1]
    assert last.in_term + last.out_term < 0.5 * (first.in_term + first.out_term)
    assert not model.training  # returned ready for scoring


def test_oe_finetuning_flattens_outlier_softmax():
    x, y = id_data()
    xo = outliers()
    model = train_classifier(tiny_model(), (x, y), epochs=10, lr=0.05, batch_size=32, progress=False)
    with torch.no_grad():
        before = torch.softmax(model(xo), 1).amax(1).mean()
    finetune(model, (x, y), xo, OutlierExposureLoss(), lr=0.05, epochs=10, id_batch_size=32, outlier_batch_size=48,
             progress=False)
    with torch.no_grad():
        after = torch.softmax(model(xo), 1).amax(1).mean()
    assert after < before - 0.1


# ---------- data handling ----------

class Unlabelled(Dataset):
    """Outliers as a Dataset of (x, -1), the convention of ebood.data for unlabelled sets."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], -1


def test_accepts_datasets_loaders_and_unlabelled_outliers():
    x, y = id_data()
    xo = outliers()
    model = finetune(tiny_model(), DataLoader(TensorDataset(x, y), batch_size=40, shuffle=False), Unlabelled(xo),
                     "oe", **FAST)
    assert isinstance(model, nn.Module)
    steps = []
    finetune(tiny_model(), TensorDataset(x, y), DataLoader(xo, batch_size=25), "energy",
             on_step=lambda s: steps.append(s.step), **FAST)
    assert steps == list(range(1, 3 * 4 + 1))  # 120 ID samples in batches of 32: 4 steps per epoch


def test_outlier_stream_cycles_every_sample_once_per_pass_and_can_start_anywhere():
    ds = TensorDataset(torch.arange(10.0)[:, None])
    src = OutlierSource(ds, batch_size=4, seed=3)
    it = src.stream()
    drawn = torch.cat([next(it)[:, 0] for _ in range(5)])  # 20 samples = two passes over 10
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))
    assert not torch.equal(drawn[:10], drawn[10:])  # each pass reshuffled
    late = OutlierSource(ds, batch_size=4, seed=3).stream(start_batch=3)
    assert torch.equal(torch.cat([next(late)[:, 0] for _ in range(2)]), drawn[12:20])
    big = OutlierSource(ds, batch_size=25, seed=3).stream()  # batch larger than the set: wraps around
    assert next(big).shape == (25, 1)


def test_id_labels_must_be_valid_classes():
    x, y = id_data()
    with pytest.raises(ValueError, match="found -1"):
        finetune(tiny_model(), (x, torch.full_like(y, -1)), outliers(), "energy", **FAST)


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"id_batch_size": 0}, "id_batch_size"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"loss": "nope"}, "unknown loss"),
])
def test_bad_settings_raise(kwargs, match):
    x, y = id_data()
    loss = kwargs.pop("loss", "energy")
    with pytest.raises(ValueError, match=match):
        finetune(tiny_model(), (x, y), outliers(), loss, progress=False, **kwargs)


def test_bad_data_raise():
    x, y = id_data()
    with pytest.raises(ValueError, match="different lengths"):
        finetune(tiny_model(), (x, y[:5]), outliers(), "energy", **FAST)
    with pytest.raises(ValueError, match="outlier_data is empty"):
        finetune(tiny_model(), (x, y), outliers()[:0], "energy", **FAST)
    with pytest.raises(TypeError, match="id_data must be"):
        finetune(tiny_model(), [1, 2, 3], outliers(), "energy", **FAST)
    with pytest.raises(ValueError, match="logits of shape"):
        finetune(nn.Sequential(nn.Linear(DIM, 3), nn.Flatten(0)), (x, y), outliers(), "energy", **FAST)


# ---------- determinism, checkpoints, resume ----------

def test_same_seed_gives_bit_identical_weights_and_leaves_global_rng_alone():
    x, y = id_data()
    model = tiny_model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = weights(finetune(model, (x, y), outliers(), "energy", seed=5, **FAST))
    assert torch.equal(torch.get_rng_state(), state)
    b = weights(finetune(tiny_model(), (x, y), outliers(), "energy", seed=5, **FAST))
    c = weights(finetune(tiny_model(), (x, y), outliers(), "energy", seed=6, **FAST))
    assert_same_weights(a, b)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoints_hold_weights_momentum_and_run_record(tmp_path):
    x, y = id_data()
    model = tiny_model()
    opt_seen = {}
    loss = EnergyBoundedLoss(m_in=-9.0, m_out=-3.0)
    finetune(model, (x, y), outliers(), loss, checkpoint_dir=tmp_path, seed=2, **FAST)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["epoch-001", "epoch-002", "epoch-003"]
    last = tmp_path / "epoch-003"
    info = json.loads((last / "training.json").read_text())
    assert info["epoch"] == 3 and info["step"] == 12
    assert info["settings"]["loss"] == {"loss": "energy", "m_in": -9.0, "m_out": -3.0, "weight": 0.1,
                                        "temperature": 1.0}
    assert info["settings"]["lr"] == 1e-3 and info["settings"]["seed"] == 2
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3]
    assert {"loss", "ce", "in_term", "out_term", "energy_in", "energy_out"} <= set(info["history"][0])
    # model.safetensors is a plain state dict; momentum buffers are tensors in optimizer.safetensors
    with safe_open(str(last / "model.safetensors"), "pt") as f:
        for k, v in model.state_dict().items():
            assert torch.equal(f.get_tensor(k), v)
    with safe_open(str(last / "optimizer.safetensors"), "pt") as f:
        opt_seen = {k: f.get_tensor(k) for k in f.keys()}
    n_params = len(list(model.parameters()))
    assert {f"state.{i}.momentum_buffer" for i in range(n_params)} <= set(opt_seen)
    assert "rng.cpu" in opt_seen
    ckpt = load_checkpoint(tmp_path)  # folder of checkpoints -> latest
    assert ckpt.path == last and ckpt.epoch == 3 and ckpt.step == 12


def test_interrupt_keeps_last_checkpoint_and_resume_matches_uninterrupted_run(tmp_path):
    x, y = id_data()
    after_epoch_1 = {}
    model = tiny_model()

    def remember(m):
        if m.epoch == 1:
            after_epoch_1.update(weights(model))

    full = weights(finetune(model, (x, y), outliers(), "energy", seed=4, on_epoch=remember, **FAST))

    def ctrl_c_at_step_6(info):
        if info.step == 6:  # in epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="epoch 2") as excinfo:
        finetune(tiny_model(), (x, y), outliers(), "energy", seed=4, checkpoint_dir=run_dir,
                 on_step=ctrl_c_at_step_6, **FAST)
    assert isinstance(excinfo.value, KeyboardInterrupt)
    assert excinfo.value.checkpoint == run_dir / "epoch-001"
    assert sorted(p.name for p in run_dir.iterdir()) == ["epoch-001"]  # intact, no partial folder left
    assert_same_weights(load_checkpoint(run_dir).model_state, after_epoch_1)

    resumed = weights(finetune(tiny_model(seed=99), (x, y), outliers(), "energy", seed=4, resume=run_dir, **FAST))
    assert_same_weights(resumed, full)
    assert sorted(p.name for p in run_dir.iterdir()) == ["epoch-001", "epoch-002", "epoch-003"]


def test_interrupt_from_data_iterator(tmp_path):
    x, y = id_data()

    class Exploding(Dataset):
        calls = 0

        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            Exploding.calls += 1
            if Exploding.calls > 200:  # during epoch 2 (120 samples per epoch)
                raise KeyboardInterrupt
            return x[i], y[i]

    with pytest.raises(TrainingInterrupted):
        finetune(tiny_model(), Exploding(), outliers(), "energy", checkpoint_dir=tmp_path, **FAST)
    assert load_checkpoint(tmp_path).epoch == 1


def test_resume_refuses_changed_settings_and_fresh_run_refuses_used_folder(tmp_path):
    x, y = id_data()
    finetune(tiny_model(), (x, y), outliers(), "energy", checkpoint_dir=tmp_path, **dict(FAST, epochs=1))
    with pytest.raises(ValueError, match="lr"):
        finetune(tiny_model(), (x, y), outliers(), "energy", resume=tmp_path, **dict(FAST, epochs=1), lr=0.5)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        finetune(tiny_model(), (x, y), outliers(), "energy", checkpoint_dir=tmp_path, **dict(FAST, epochs=1))
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        finetune(tiny_model(), (x, y), outliers(), "energy", resume=tmp_path / "nothing", **FAST)
    with pytest.raises(ValueError, match="steps per epoch"):  # other ID data: the schedule would not match
        finetune(tiny_model(), (x[:40], y[:40]), outliers(), "energy", resume=tmp_path, **dict(FAST, epochs=1))


def test_corrupt_checkpoint_is_refused(tmp_path):
    x, y = id_data()
    finetune(tiny_model(), (x, y), outliers(), "energy", checkpoint_dir=tmp_path, **dict(FAST, epochs=1))
    f = tmp_path / "epoch-001" / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        finetune(tiny_model(), (x, y), outliers(), "energy", resume=tmp_path, **dict(FAST, epochs=2))


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    x, y = id_data()
    inner = EnergyBoundedLoss()
    calls = []

    def poisoned(a, b, c):
        calls.append(1)
        parts = inner(a, b, c)
        return parts._replace(total=parts.total * math.nan) if len(calls) == 7 else parts

    model = tiny_model()
    good = {}
    with pytest.raises(NonFiniteLossError, match=r"step 7 \(epoch 2, step 3 of the epoch\)") as excinfo:
        finetune(model, (x, y), outliers(), poisoned, checkpoint_dir=tmp_path,
                 on_step=lambda s: good.update(weights(model)) if s.step == 6 else None, **FAST)
    assert excinfo.value.checkpoint == tmp_path / "epoch-001"
    assert "epoch-001" in str(excinfo.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-001"]
    assert_same_weights(weights(model), good)  # the poisoned step was not applied


def test_nan_in_outliers_is_caught():
    x, y = id_data()
    xo = outliers()
    xo[5, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step"):
        finetune(tiny_model(), (x, y), xo, "energy", **FAST)


def test_progress_bar_on_a_terminal(monkeypatch, capsys):
    import rich.console

    x, y = id_data()
    finetune(tiny_model(), (x, y), outliers(), "energy", **dict(FAST, epochs=1, progress=True))
    assert capsys.readouterr().err == ""  # not a terminal: silent
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    finetune(tiny_model(), (x, y), outliers(), "energy", **dict(FAST, epochs=1, progress=True))
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "E_in" in err and "E_out" in err


# ---------- classifier training ----------

@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("adam", 0.01)])
def test_train_classifier_learns_and_is_deterministic(optimizer, lr):
    x, y = id_data()
    xt, yt = id_data(seed=0, n=60)  # same class centres (seed 0), fresh noise rows differ by n
    runs = []
    for _ in range(2):
        metrics = []
        m = train_classifier(tiny_model(), (x, y), epochs=8, lr=lr, optimizer=optimizer, batch_size=32,
                             validation=(xt, yt), progress=False, on_epoch=metrics.append)
        runs.append(weights(m))
    assert_same_weights(*runs)
    assert metrics[-1].val_accuracy >= 0.95
    assert metrics[-1].in_term == 0 and math.isnan(metrics[-1].energy_out)


def test_train_classifier_resume(tmp_path):
    x, y = id_data()
    kw = dict(epochs=4, lr=0.1, batch_size=32, progress=False)
    full = weights(train_classifier(tiny_model(), (x, y), **kw))
    with pytest.raises(TrainingInterrupted):
        train_classifier(tiny_model(), (x, y), checkpoint_dir=tmp_path, **kw,
                         on_epoch=lambda m: (_ for _ in ()).throw(KeyboardInterrupt) if m.epoch == 2 else None)
    assert load_checkpoint(tmp_path).epoch == 2
    assert_same_weights(weights(train_classifier(tiny_model(), (x, y), resume=tmp_path, **kw)), full)


def test_train_classifier_rejects_unknown_optimizer():
    x, y = id_data()
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(tiny_model(), (x, y), optimizer="rmsprop", progress=False)


# ---------- margins ----------

def test_margins_from_energies_quantile_rule_and_fallback():
    e_id = np.arange(-30.0, -10.0)  # -30 ... -11
    e_out = np.arange(-12.0, -2.0)  # -12 ... -3
    assert margins_from_energies(e_id, e_out, q_in=0.0, q_out=1.0) == (-30.0, -3.0)
    # 0.5 quantile of 20 evenly spaced values -30..-11 is their mean -20.5; of -12..-3 it is -7.5
    assert margins_from_energies(e_id, e_out, q_in=0.5, q_out=0.5) == (-20.5, -7.5)
    # reversed sets: m_out (0.05 quantile of low energies) < m_in -> centred on the medians, min_gap apart
    m = margins_from_energies(e_out, e_id, q_in=0.95, q_out=0.05, min_gap=2.0)
    centre = (-7.5 + -20.5) / 2
    assert m == pytest.approx((centre - 1.0, centre + 1.0))
    with pytest.raises(ValueError, match="q_in"):
        margins_from_energies(e_id, e_out, q_in=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        margins_from_energies([math.nan, 1.0], e_out)


def test_suggest_margins_uses_the_models_energies():
    # An identity "classifier": the logits are the inputs, so energies are -logsumexp of the rows.
    g = torch.Generator().manual_seed(0)
    xi, xo = torch.randn(200, 4, generator=g) * 5, torch.randn(300, 4, generator=g)
    model = nn.Identity()
    model.register_parameter("p", nn.Parameter(torch.zeros(1)))  # gives the model a device and dtype
    m = suggest_margins(model, (xi, torch.zeros(200, dtype=torch.long)), xo, q_in=0.1, q_out=0.9)
    e_in, e_out = -logsumexp(xi.double().numpy(), 1), -logsumexp(xo.double().numpy(), 1)
    assert m.m_in == pytest.approx(np.quantile(e_in, 0.1), abs=1e-5)
    assert m.m_out == pytest.approx(np.quantile(e_out, 0.9), abs=1e-5)
    sub = suggest_margins(model, (xi, torch.zeros(200, dtype=torch.long)), xo, max_samples=50)
    assert isinstance(sub.m_in, float)


# ---------- presets ----------

def test_presets_hold_the_papers_recipes():
    from ebood.train import get_preset

    paper = {"epochs": 10, "lr": 1e-3, "lr_min": 1e-6, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
             "id_batch_size": 128, "outlier_batch_size": 256}  # /work/shared/REFERENCES.md, official code
    margins = {"cifar10": (-23.0, -5.0), "cifar100": (-27.0, -5.0)}  # the official run script
    for name, (m_in, m_out) in margins.items():
        p = get_preset(name)
        assert p.model == "wrn40_2" and p.num_classes == int(name[5:]) and p.id_data == f"{name}:train"
        assert p.finetune_kwargs() == paper
        assert p.loss_params("energy") == {"m_in": m_in, "m_out": m_out, "weight": 0.1}
        assert p.loss_params("oe") == {"weight": 0.5}
    with pytest.raises(ValueError, match="available: builtin, cifar10, cifar100"):
        get_preset("imagenet")


# ---------- augmentation ----------

def test_random_crop_flip_matches_a_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 7, generator=g)
    aug = RandomCropFlip(padding=2, fill=[0.5, -1.0, 2.0])
    out = aug(x, torch.Generator().manual_seed(11))
    draws = torch.Generator().manual_seed(11)  # the documented draws: offsets (row, col), then flips
    offsets = torch.randint(0, 5, (6, 2), generator=draws)
    flips = torch.rand(6, generator=draws) < 0.5
    assert 0 < int(flips.sum()) < 6
    for i in range(6):
        canvas = torch.tensor([0.5, -1.0, 2.0])[:, None, None].repeat(1, 9, 11)
        canvas[:, 2:7, 2:9] = x[i]
        oy, ox = offsets[i].tolist()
        ref = canvas[:, oy:oy + 5, ox:ox + 7]
        torch.testing.assert_close(out[i], ref.flip(2) if flips[i] else ref, rtol=0, atol=0)
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(x, g), x)
    black = RandomCropFlip.for_normalized([0.5, 0.25], [0.5, 0.25])
    assert black.fill == [-1.0, -1.0]
    with pytest.raises(ValueError, match="N, C, H, W"):
        black(torch.zeros(3, 4), g)
    with pytest.raises(ValueError, match="padding"):
        RandomCropFlip(padding=-1)


def test_augmented_finetuning_is_seeded_per_step_and_resumes_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % N_CLASSES
    x = torch.randn(N_CLASSES, 1, 4, 4, generator=g)[y] + 0.3 * torch.randn(96, 1, 4, 4, generator=g)
    xo = torch.rand(80, 1, 4, 4, generator=g) * 4 - 2

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, N_CLASSES))

    kw = dict(epochs=3, id_batch_size=32, outlier_batch_size=40, lr=0.05, progress=False)
    aug = RandomCropFlip(padding=1)
    full = weights(finetune(model(), (x, y), xo, "energy", augment=aug, **kw))
    plain = weights(finetune(model(), (x, y), xo, "energy", **kw))
    assert not all(torch.equal(full[k], plain[k]) for k in full)  # the augmentation is applied
    with pytest.raises(TrainingInterrupted):
        finetune(model(), (x, y), xo, "energy", augment=aug, checkpoint_dir=tmp_path, **kw,
                 on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s.step == 5 else None)
    assert load_checkpoint(tmp_path).info["settings"]["augment"] == aug.config()
    assert_same_weights(weights(finetune(model(), (x, y), xo, "energy", augment=aug, resume=tmp_path, **kw)), full)
    with pytest.raises(ValueError, match="augment"):  # resuming without the augmentation changes the run
        finetune(model(), (x, y), xo, "energy", resume=tmp_path, **kw)
