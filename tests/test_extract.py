"""ebood.extract: outputs equal a forward pass written out by hand; hooks, modes and devices are left
as found (also after an exception); caching hits and invalidates; errors name the problem."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import ebood
from ebood.extraction import PENULTIMATE, ExtractionError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class Tiny(nn.Module):
    """conv-BN-ReLU, global average pool, fc1-ReLU, dropout, head ``fc``; counts its forward calls."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, classes)
        self.calls = 0
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        self.calls += 1
        h = F.relu(self.bn(self.conv(x)))
        z = F.relu(self.fc1(h.mean(dim=(2, 3))))
        return self.fc(self.drop(z))


def by_hand(m: Tiny, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same network in float64 functional ops, eval mode (running BN statistics, no dropout)."""
    d = lambda t: t.detach().double()  # noqa: E731
    x = x.double()
    conv = F.conv2d(x, d(m.conv.weight), d(m.conv.bias), padding=1)
    bn = (conv - d(m.bn.running_mean)[None, :, None, None]) / torch.sqrt(d(m.bn.running_var) + m.bn.eps)[None, :, None, None]
    bn = bn * d(m.bn.weight)[None, :, None, None] + d(m.bn.bias)[None, :, None, None]
    pooled = F.relu(bn).mean(dim=(2, 3))
    pen = F.relu(pooled @ d(m.fc1.weight).T + d(m.fc1.bias))
    return {"conv": conv.mean(dim=(2, 3)), "conv_max": conv.amax(dim=(2, 3)), "conv_flat": conv.reshape(len(x), -1), "bn": bn.mean(dim=(2, 3)),
            "fc1": pooled @ d(m.fc1.weight).T + d(m.fc1.bias), PENULTIMATE: pen, "logits": pen @ d(m.fc.weight).T + d(m.fc.bias)}


def make_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def make_data(n: int = 37, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


class PairDataset(Dataset):
    def __init__(self, x, y, fail_at=None, fingerprint=None):
        self.x, self.y, self.fail_at, self.reads = x, y, fail_at, 0
        if fingerprint is not None:
            self.fingerprint = fingerprint

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        if self.fail_at is not None and i == self.fail_at:
            raise RuntimeError("disk on fire")
        return self.x[i], int(self.y[i])


def close(a, b, tol=1e-5):
    return torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


# ----- outputs equal a direct forward pass -------------------------------------------------------


def test_logits_features_head_and_labels_equal_a_forward_pass():
    m, (x, y) = make_model(), make_data()
    out = ebood.extract(m, PairDataset(x, y), batch_size=10, progress=False)
    ref = by_hand(m, x)
    assert out.logits.shape == (37, 3) and out.logits.dtype == torch.float32 and out.logits.device.type == "cpu"
    assert close(out.logits, ref["logits"])
    assert close(out.features, ref[PENULTIMATE])  # default: the input of the last nn.Linear
    assert torch.equal(out.labels, y)
    assert torch.equal(out.head.weight, m.fc.weight.detach()) and torch.equal(out.head.bias, m.fc.bias.detach())
    assert close(out.head(out.features), ref["logits"])
    assert not out.logits.requires_grad


def test_named_layers_are_pooled_and_followed_by_the_penultimate_layer():
    m, (x, _) = make_model(), make_data()
    ref = by_hand(m, x)
    out = ebood.extract(m, x, layers=["bn", "conv", "fc1"], progress=False)
    assert list(out.features) == ["bn", "conv", "fc1", PENULTIMATE]
    for name in ("bn", "conv", "fc1", PENULTIMATE):
        assert close(out.features[name], ref[name]), name
    assert out.labels is None
    assert close(out.head(out.feature()), ref["logits"])
    mx = ebood.extract(m, x, layers=["conv"], pool="max", progress=False)
    assert close(mx.features["conv"], ref["conv_max"])
    flat = ebood.extract(m, x, layers=["conv"], pool="flatten", progress=False)
    assert close(flat.features["conv"], ref["conv_flat"])
    only = ebood.extract(m, x, layers=[PENULTIMATE], progress=False)
    assert list(only.features) == [PENULTIMATE] and close(only.features[PENULTIMATE], ref[PENULTIMATE])


def test_data_forms_dataloader_dicts_arrays():
    m, (x, y) = make_model(), make_data(20)
    ref = by_hand(m, x)["logits"]

    class Dicts(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"input": x[i], "label": int(y[i])}

    for data in (DataLoader(PairDataset(x, y), batch_size=7), Dicts(), (x.numpy(), y.numpy()), (x, y)):
        out = ebood.extract(m, data, progress=False)
        assert close(out.logits, ref) and torch.equal(out.labels, y)
    out = ebood.extract(m, x.numpy(), progress=False)
    assert close(out.logits, ref) and out.labels is None


def test_labels_minus_one_mean_unlabelled():
    m, (x, y) = make_model(), make_data(12)
    ood = ebood.extract(m, (x, torch.full((12,), -1)), progress=False)
    assert ood.labels is None
    mixed_labels = y.clone()
    mixed_labels[::3] = -1
    mixed = ebood.extract(m, (x, mixed_labels), progress=False)
    assert torch.equal(mixed.labels, mixed_labels)


def test_amp_bfloat16_gives_float32_close_to_full_precision():
    m, (x, _) = make_model(), make_data()
    out = ebood.extract(m, x, amp="bfloat16", progress=False)
    assert out.logits.dtype == torch.float32 and out.features.dtype == torch.float32
    assert torch.allclose(out.logits.double(), by_hand(m, x)["logits"], atol=0.05)
    with pytest.raises(ExtractionError, match="amp must be"):
        ebood.extract(m, x, amp="int8", progress=False)


def test_float64_model_gives_float64_outputs():
    m, (x, _) = make_model(), make_data()
    m.double()
    out = ebood.extract(m, x.double(), progress=False)
    assert out.logits.dtype == torch.float64
    assert torch.allclose(out.logits, by_hand(m, x)["logits"], atol=1e-12)


def test_unavailable_device_is_named():
    m, (x, _) = make_model(), make_data()
    if not torch.cuda.is_available():
        with pytest.raises(ExtractionError, match="CUDA is not available"):
            ebood.extract(m, x, device="cuda", progress=False)


# ----- hooks and modes are left as found ---------------------------------------------------------


def hook_count(m: nn.Module) -> int:
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())


def test_eval_mode_during_the_run_and_modes_restored():
    m, (x, _) = make_model(), make_data()
    m.train()
    m.fc1.eval()  # a mixed state must come back exactly
    stats = m.bn.running_mean.clone()
    out = ebood.extract(m, x, progress=False)
    assert close(out.logits, by_hand(m, x)["logits"])  # no dropout, running BN statistics
    assert torch.equal(m.bn.running_mean, stats)  # BN statistics untouched
    assert m.training and m.bn.training and m.drop.training and not m.fc1.training
    m.eval()
    ebood.extract(m, x, progress=False)
    assert not any(mod.training for mod in m.modules())


def test_hooks_removed_after_success_and_after_an_exception():
    m, (x, y) = make_model(), make_data(30)
    m.train()
    user_hook = m.fc.register_forward_hook(lambda *a: None)  # the user's own hook must survive
    before = hook_count(m)
    ebood.extract(m, x, layers=["conv", "bn"], progress=False)
    assert hook_count(m) == before
    with pytest.raises(RuntimeError, match="disk on fire"):
        ebood.extract(m, PairDataset(x, y, fail_at=25), layers=["conv"], batch_size=8, progress=False)
    assert hook_count(m) == before
    assert m.training and all(mod.training for mod in m.modules())
    user_hook.remove()
    assert hook_count(m) == 0


def test_progress_is_quiet_when_not_a_terminal(capsys):
    m, (x, _) = make_model(), make_data()
    ebood.extract(m, x, progress=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# ----- caching -----------------------------------------------------------------------------------


def test_cache_hit_does_not_run_the_model(tmp_path):
    m, (x, y) = make_model(), make_data()
    first = ebood.extract(m, PairDataset(x, y), cache=tmp_path, layers=["bn"], progress=False)
    calls = m.calls
    assert calls > 0 and len(list(tmp_path.glob("*.safetensors"))) == 1
    second = ebood.extract(m, PairDataset(x, y), cache=tmp_path, layers=["bn"], progress=False)
    assert m.calls == calls  # loaded, not recomputed
    assert torch.equal(first.logits, second.logits) and torch.equal(first.labels, second.labels)
    assert list(second.features) == ["bn", PENULTIMATE]
    assert all(torch.equal(first.features[k], second.features[k]) for k in first.features)
    assert torch.equal(first.head.weight, second.head.weight)
    ebood.extract(m, PairDataset(x, y), cache=tmp_path, progress=False)  # other layers: another entry
    assert m.calls > calls and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cache_invalidates_when_weights_change(tmp_path):
    m, (x, _) = make_model(), make_data()
    ebood.extract(m, x, cache=tmp_path, progress=False)
    with torch.no_grad():
        m.fc.bias += 1.0
    calls = m.calls
    out = ebood.extract(m, x, cache=tmp_path, progress=False)
    assert m.calls > calls
    assert close(out.logits, by_hand(m, x)["logits"])
    with torch.no_grad():
        m.bn.running_var *= 2  # a buffer, not a parameter
    calls = m.calls
    out = ebood.extract(m, x, cache=tmp_path, progress=False)
    assert m.calls > calls and close(out.logits, by_hand(m, x)["logits"])


def test_cache_invalidates_when_data_change(tmp_path):
    m, (x, y) = make_model(), make_data()
    ebood.extract(m, PairDataset(x, y), cache=tmp_path, progress=False)
    calls = m.calls
    x2 = x.clone()
    x2[-1, 0, 0, 0] += 1.0  # the last sample
    out = ebood.extract(m, PairDataset(x2, y), cache=tmp_path, progress=False)
    assert m.calls > calls and close(out.logits, by_hand(m, x2)["logits"])
    calls = m.calls
    ebood.extract(m, PairDataset(x2[:-1], y[:-1]), cache=tmp_path, progress=False)  # other length
    assert m.calls > calls
    # arrays are hashed in full: a change in the middle is seen too
    ebood.extract(m, x, cache=tmp_path, progress=False)
    x3 = x.clone()
    x3[17] += 1
    calls = m.calls
    out = ebood.extract(m, x3, cache=tmp_path, progress=False)
    assert m.calls > calls and close(out.logits, by_hand(m, x3)["logits"])


def test_dataset_fingerprint_is_the_identity(tmp_path):
    m, (x, y) = make_model(), make_data()
    ebood.extract(m, PairDataset(x, y, fingerprint="set-v1"), cache=tmp_path, progress=False)
    calls = m.calls
    ebood.extract(m, PairDataset(x, y, fingerprint="set-v1"), cache=tmp_path, progress=False)
    assert m.calls == calls
    ebood.extract(m, PairDataset(x, y, fingerprint="set-v2"), cache=tmp_path, progress=False)
    assert m.calls > calls


def test_corrupt_or_stale_cache_entries_are_recomputed(tmp_path):
    m, (x, _) = make_model(), make_data()
    good = ebood.extract(m, x, cache=tmp_path, progress=False)
    (entry,) = tmp_path.glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0x55  # flip bits in the tensor payload
    entry.write_bytes(bytes(data))
    calls = m.calls
    with pytest.warns(RuntimeWarning, match="stale or corrupt.*checksum"):
        again = ebood.extract(m, x, cache=tmp_path, progress=False)
    assert m.calls > calls and torch.equal(again.logits, good.logits)
    calls = m.calls
    ebood.extract(m, x, cache=tmp_path, progress=False)  # the entry was rewritten
    assert m.calls == calls
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match="truncated"):
        ebood.extract(m, x, cache=tmp_path, progress=False)
    assert m.calls > calls
    # a valid file under another entry's name (copied around) is stale, not used
    other = ebood.extract(m, x[:5], cache=tmp_path, progress=False)
    files = sorted(tmp_path.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    files[-1].replace(entry)
    calls = m.calls
    with pytest.warns(RuntimeWarning, match="key mismatch"):
        out = ebood.extract(m, x, cache=tmp_path, progress=False)
    assert m.calls > calls and len(out) == len(x) and len(other) == 5


def test_uncacheable_data_warn_and_run(tmp_path):
    m, (x, y) = make_model(), make_data()

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y.tolist()))

    with pytest.warns(RuntimeWarning, match="not caching"):
        out = ebood.extract(m, Stream(), cache=tmp_path, progress=False)
    assert close(out.logits, by_hand(m, x)["logits"])
    with pytest.warns(RuntimeWarning, match="shuffles"):
        ebood.extract(m, DataLoader(PairDataset(x, y), shuffle=True), cache=tmp_path, progress=False)
    assert list(tmp_path.glob("*.safetensors")) == []


# ----- errors ------------------------------------------------------------------------------------


def test_unknown_layer_suggests_close_names():
    m, (x, _) = make_model(), make_data()
    with pytest.raises(ExtractionError, match=r"no submodule 'fc2'. Did you mean .*'fc1'"):
        ebood.extract(m, x, layers=["fc2"], progress=False)
    with pytest.raises(ExtractionError, match="more than once"):
        ebood.extract(m, x, layers=["conv", "conv"], progress=False)


class TupleOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)
        self.kind = kind

    def forward(self, x):
        h = torch.relu(self.body(x))
        z = self.fc(h)
        if self.kind == "tuple":
            return z, h
        if self.kind == "dict":
            return {"features": h, "logits": z}
        return z[:, :, None, None].expand(-1, -1, 2, 2)  # a (N, C, H, W) map


def test_tuple_and_dict_outputs_need_output_selection():
    torch.manual_seed(0)
    x = torch.randn(9, 4)
    for kind, sel in (("tuple", 0), ("dict", "logits")):
        m = TupleOut(kind)
        with pytest.raises(ExtractionError, match="Select the logits with output="):
            ebood.extract(m, x, progress=False)
        out = ebood.extract(m, x, output=sel, progress=False)
        with torch.no_grad():
            ref = m.fc(torch.relu(m.body(x)))
        assert torch.allclose(out.logits, ref, atol=1e-6)
        assert torch.allclose(out.features, torch.relu(m.body(x)).detach(), atol=1e-6)
    by_fn = ebood.extract(TupleOut("tuple"), x, output=lambda o: o[0], progress=False)
    assert by_fn.logits.shape == (9, 3)
    with pytest.raises(ExtractionError, match="selects nothing"):
        ebood.extract(TupleOut("tuple"), x, output=5, progress=False)
    with pytest.raises(ExtractionError, match=r"shape \(9, 3, 2, 2\).*\(N, C\) logits"):
        ebood.extract(TupleOut("map"), x, progress=False)


def test_layer_returning_a_tuple_is_named():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.pair(x)[0])

    with pytest.raises(ExtractionError, match="layer 'pair'.*returns a tuple"):
        ebood.extract(Net(), torch.randn(3, 4), layers=["pair"], progress=False)


def test_bad_data_is_named():
    m, (x, y) = make_model(), make_data(6)

    class Triples(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return x[i], 0, "extra"

    class NoInputKey(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"image": x[i]}

    with pytest.raises(ExtractionError, match="3 elements"):
        ebood.extract(m, Triples(), progress=False)
    with pytest.raises(ExtractionError, match="keys 'image'.*'input'"):
        ebood.extract(m, NoInputKey(), progress=False)
    with pytest.raises(ExtractionError, match="empty"):
        ebood.extract(m, x[:0], progress=False)
    with pytest.raises(ExtractionError, match="empty"):
        ebood.extract(m, PairDataset(x[:0], y[:0]), progress=False)
    with pytest.raises(ExtractionError, match="already batches"):
        ebood.extract(m, DataLoader(PairDataset(x, y)), batch_size=4, progress=False)
    with pytest.raises(ExtractionError, match="cannot read data"):
        ebood.extract(m, 3.5, progress=False)
    with pytest.raises(ExtractionError, match="labels must be one integer"):
        ebood.extract(m, (x, torch.rand(6)), progress=False)


def test_last_linear_that_is_not_the_head_is_not_reported_as_one():
    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(x)[:, :3]  # the logits are a slice of the last Linear's output

    with pytest.warns(RuntimeWarning, match="not the classifier head"):
        out = ebood.extract(Projected(), torch.randn(5, 4), progress=False)
    assert out.head is None and out.features is None and out.logits.shape == (5, 3)
    with pytest.raises(ExtractionError, match="'penultimate'.*not the classifier head"):
        ebood.extract(Projected(), torch.randn(5, 4), layers=[PENULTIMATE], progress=False)


def test_torchscript_models_give_logits_only():
    m, (x, _) = make_model(), make_data()
    scripted = torch.jit.script(m.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ebood.extract(scripted, x, progress=False)
    assert close(out.logits, by_hand(m, x)["logits"]) and out.features is None and out.head is None
    with pytest.raises(ExtractionError, match="TorchScript"):
        ebood.extract(scripted, x, layers=["conv"], progress=False)


def test_on_batch_sees_every_batch_once_in_order(tmp_path):
    m, (x, y) = make_model(), make_data(23)
    seen: list[torch.Tensor] = []
    ds = PairDataset(x, y)
    ebood.extract(m, ds, batch_size=5, cache=tmp_path, on_batch=lambda xb, yb: seen.append(xb.clone()), progress=False)
    assert torch.equal(torch.cat(seen), x) and len(seen) == 5
    reads = ds.reads
    seen.clear()
    calls = m.calls
    ebood.extract(m, ds, batch_size=5, cache=tmp_path, on_batch=lambda xb, yb: seen.append(xb.clone()), progress=False)
    assert m.calls == calls and torch.equal(torch.cat(seen), x)  # from cache: data read, model not run
    assert ds.reads - reads == len(x) + 2 * 5  # one read per item, plus the fingerprint's edge batches
    assert np.isfinite(torch.cat(seen).numpy()).all()


# ----- the `ebood extract` command ---------------------------------------------------------------


def test_cli_extract_writes_outputs_that_read_back(tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from ebood.cli import app, load_commands
    from ebood.models import DigitsCNN

    load_commands()
    torch.manual_seed(3)
    model = DigitsCNN().eval()
    weights = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(weights))
    x = np.random.default_rng(0).random((21, 1, 8, 8)).astype(np.float32)
    y = np.arange(21) % 10
    data = tmp_path / "data.npz"
    np.savez(data, inputs=x, labels=y)
    runner = CliRunner()
    out = tmp_path / "out.safetensors"
    res = runner.invoke(app, ["extract", "--model", "digits_cnn", "--checkpoint", str(weights), "--data", str(data),
                              "--layers", "fc1,conv1", "--batch-size", "8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    back = ebood.io.read_outputs(out)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    assert torch.allclose(back.logits, ref, atol=1e-5) and torch.equal(back.labels, torch.from_numpy(y))
    assert list(back.features)[-1] == PENULTIMATE and set(back.features) == {"fc1", "conv1", PENULTIMATE}
    assert torch.allclose(back.features["conv1"], model.conv1(torch.from_numpy(x)).mean(dim=(2, 3)).detach(), atol=1e-5)
    assert torch.allclose(back.head(back.feature()), ref, atol=1e-5)
    npy = tmp_path / "inputs.npy"
    np.save(npy, x)
    res = runner.invoke(app, ["extract", "-m", "digits_cnn", "-c", str(weights), "-d", str(npy), "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 0, res.output
    plain = ebood.io.read_outputs(tmp_path / "o.npz")
    assert plain.labels is None and torch.allclose(plain.features, back.features[PENULTIMATE], atol=1e-6)
    for args, message in [
        (["-m", "digits_cnn", "-d", str(data), "-l", "conv9", "-o", str(out)], "no submodule 'conv9'"),
        (["-m", "digit_cnn", "-d", str(data), "-o", str(out)], "unknown model 'digit_cnn'"),
        (["-m", "digits_cnn", "-d", str(data), "-o", str(tmp_path / "o.csv")], "several named arrays"),
        (["-m", "digits_cnn", "-d", str(tmp_path / "missing.npz"), "-o", str(out)], "missing.npz"),
    ]:
        res = runner.invoke(app, ["extract", *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
