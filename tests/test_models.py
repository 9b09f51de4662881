"""ebood.models: the architectures (structure, parameter counts, reference key names, training the
digits CNN) and load_model (TorchScript, entry points, built-ins, checkpoints, errors)."""

import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ebood.models import BUILTINS, DigitsCNN, ModelLoadError, ResNet18, WideResNet, load_model
from ebood.state import save_state

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----- architectures -----------------------------------------------------------------------------


def wrn_param_count(depth: int, k: int, classes: int) -> int:
    """Parameters of WRN-depth-k from its definition (Zagoruyko & Komodakis, BMVC 2016)."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 16 * 9  # stem conv, no bias
    for stage in range(3):
        for i in range(n):
            cin = widths[stage] if i == 0 else widths[stage + 1]
            cout = widths[stage + 1]
            total += 2 * cin + cin * cout * 9 + 2 * cout + cout * cout * 9  # bn1, conv1, bn2, conv2
            if cin != cout:
                total += cin * cout  # 1x1 shortcut
    return total + 2 * widths[3] + widths[3] * classes + classes  # final bn, fc


def test_wide_resnet_40_2_matches_its_definition():
    m = WideResNet()
    assert n_params(m) == wrn_param_count(40, 2, 10)
    assert abs(n_params(m) / 1e6 - 2.2) < 0.1  # "2.2M" in the WRN / energy papers
    assert isinstance(m.fc, nn.Linear) and m.fc.in_features == 128
    assert sum(isinstance(x, nn.Dropout) and x.p == 0.3 for x in m.modules()) == 18  # one per block
    # parameter names of the reference code (energy / Outlier Exposure), so their checkpoints load
    keys = set(m.state_dict())
    assert {"conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight",
            "bn1.running_mean", "fc.weight", "fc.bias"} <= keys
    assert n_params(WideResNet(depth=16, widen_factor=4, num_classes=100)) == wrn_param_count(16, 4, 100)


def test_resnet18_cifar_variant():
    m = ResNet18()
    assert n_params(m) == 11_173_962  # the CIFAR ResNet-18 (3x3 stem, no max-pool), e.g. OpenOOD / pytorch-cifar
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert {"layer1.0.conv1.weight", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var", "fc.weight"} <= set(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert m.eval()(x).shape == (2, 10)


def test_architectures_end_in_a_linear_head_whose_input_is_the_penultimate_layer():
    torch.manual_seed(0)
    for m, x in [(WideResNet(depth=10, widen_factor=1), torch.randn(3, 3, 32, 32)), (ResNet18(num_classes=7), torch.randn(3, 3, 32, 32)),
                 (DigitsCNN(num_classes=4), torch.rand(3, 1, 8, 8))]:
        m.eval()
        seen = {}
        h = m.fc.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
        with torch.no_grad():
            logits = m(x)
        h.remove()
        assert torch.equal(logits, seen["out"])
        assert seen["x"].shape == (3, m.fc.in_features)
        assert logits.shape == (3, m.fc.out_features)


def test_digits_cnn_forward_by_hand():
    torch.manual_seed(1)
    m = DigitsCNN().eval()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    m = m.double()
    h = F.relu(F.conv2d(x, m.conv1.weight, m.conv1.bias, padding=1))
    h = F.max_pool2d(F.relu(F.conv2d(h, m.conv2.weight, m.conv2.bias, padding=1)), 2)
    h = F.relu(h.reshape(5, -1) @ m.fc1.weight.T + m.fc1.bias)
    expected = h @ m.fc.weight.T + m.fc.bias
    with torch.no_grad():
        assert torch.allclose(m(x), expected, atol=1e-12)
        assert torch.allclose(m(x[:, 0]), expected, atol=1e-12)  # (N, 8, 8) accepted


def test_digits_cnn_trains_to_95_percent_on_sklearn_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and robust on a shared machine
    try:
        acc = _train_digits(load_digits, train_test_split)
    finally:
        torch.set_num_threads(threads)
    assert acc >= 0.95


def _train_digits(load_digits, train_test_split) -> float:
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = (torch.as_tensor(a) for a in train_test_split(X, y, test_size=0.3, random_state=0, stratify=y))
    m = DigitsCNN()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(8):
        m.train()
        for idx in torch.randperm(len(xtr)).split(64):
            opt.zero_grad()
            F.cross_entropy(m(xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        return (m.eval()(xte).argmax(1) == yte).double().mean().item()


def test_bad_architecture_arguments():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=41)
    with pytest.raises(ValueError, match="dropout"):
        WideResNet(dropout=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        ResNet18(num_classes=0)


# ----- load_model: specs -------------------------------------------------------------------------


def test_builtin_names_and_kwargs():
    m = load_model("wrn40_2", num_classes=100)
    assert isinstance(m, WideResNet) and m.depth == 40 and m.widen_factor == 2 and m.dropout == 0.3
    assert m.fc.out_features == 100 and not m.training
    assert isinstance(load_model("resnet18_cifar"), ResNet18)
    assert isinstance(load_model("digits_cnn", num_classes=3), DigitsCNN)
    assert {"wrn40_2", "resnet18_cifar", "digits_cnn"} <= set(BUILTINS)


def test_unknown_builtin_suggests_close_names():
    with pytest.raises(ModelLoadError, match="'digits_cnn'"):
        load_model("digit_cnn")
    with pytest.raises(ModelLoadError, match="bad arguments"):
        load_model("digits_cnn", no_such_argument=1)
    with pytest.raises(ModelLoadError, match="no such model file"):
        load_model("missing/model.pt")


def test_torchscript_file(tmp_path):
    torch.manual_seed(2)
    m = DigitsCNN().eval()
    path = tmp_path / "model.ts"
    torch.jit.script(m).save(str(path))
    loaded = load_model(str(path))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), m(x), atol=1e-6)
    with pytest.raises(ModelLoadError, match="no constructor arguments"):
        load_model(str(path), num_classes=3)


def test_a_state_dict_given_as_the_model_is_not_torchscript(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(DigitsCNN().state_dict(), path)
    with pytest.raises(ModelLoadError, match="not a TorchScript file.*checkpoint="):
        load_model(str(path))


@pytest.fixture
def entry_module(tmp_path, monkeypatch):
    (tmp_path / "ebood_test_entry.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build(width=5, classes=3):
            return nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.ReLU(), nn.Linear(width, classes))

        class Holder:
            @staticmethod
            def make():
                return build(2, 2)

        def not_a_model():
            return 42

        VALUE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ebood_test_entry"
    sys.modules.pop("ebood_test_entry", None)


def test_entry_point(entry_module):
    m = load_model(f"{entry_module}:build", width=7, classes=4)
    assert m[1].out_features == 7 and m[3].out_features == 4
    assert load_model(f"{entry_module}:Holder.make")[3].out_features == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ebood_no_such_module:build", "cannot import module 'ebood_no_such_module'"),
        ("{m}:missing", "has no attribute 'missing'"),
        ("{m}:not_a_model", "returned a int, expected a torch.nn.Module"),
        ("{m}:VALUE", "not a function or class"),
    ],
)
def test_bad_entry_points(entry_module, spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec.format(m=entry_module))


# ----- load_model: checkpoints -------------------------------------------------------------------


def trained_like(seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    m = DigitsCNN()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_checkpoint(tmp_path):
    src = trained_like(3)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    assert_same_weights(load_model("digits_cnn", path), src)


def test_ebood_safetensors_checkpoint_is_checksummed(tmp_path):
    src = trained_like(4)
    path = tmp_path / "model.safetensors"
    save_state(path, dict(src.state_dict()), {"format": "ebood.train.model"})
    assert_same_weights(load_model("digits_cnn", path), src)
    assert_same_weights(load_model("digits_cnn", tmp_path), src)  # a training checkpoint folder
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # damage a weight
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum"):
        load_model("digits_cnn", path)


def test_pt_checkpoint_plain_and_wrapped(tmp_path):
    src = trained_like(5)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pth"
    torch.save(src.state_dict(), plain)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, wrapped)
    assert_same_weights(load_model("digits_cnn", plain), src)
    assert_same_weights(load_model("digits_cnn", wrapped), src)


class Unsafe:
    """A Python object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_pickled_checkpoint_is_refused(tmp_path):
    whole_model, with_object = tmp_path / "model.pt", tmp_path / "obj.pt"
    torch.save(trained_like(6), whole_model)
    torch.save({"state_dict": trained_like(6).state_dict(), "extra": Unsafe()}, with_object)
    for path in (whole_model, with_object):
        with pytest.raises(ModelLoadError, match="pickled Python objects"):
            load_model("digits_cnn", path)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such checkpoint"):
        load_model("digits_cnn", tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint"):
        load_model("digits_cnn", garbage)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 4)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model("digits_cnn", bad_st)
    other = tmp_path / "other.safetensors"
    save_file(DigitsCNN(num_classes=5).state_dict(), str(other))
    with pytest.raises(ModelLoadError, match=r"does not match.*fc.weight \(5, 64\) vs \(10, 64\)"):
        load_model("digits_cnn", other)
    resnet = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in ResNet18().state_dict().items()}, str(resnet))
    with pytest.raises(ModelLoadError, match="missing .*unexpected"):
        load_model("digits_cnn", resnet)
    not_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 1, "lr": 0.1}, not_tensors)
    with pytest.raises(ModelLoadError, match="expected a state dict"):
        load_model("digits_cnn", not_tensors)


def test_torchscript_with_checkpoint(tmp_path):
    path = tmp_path / "m.ts"
    torch.jit.script(DigitsCNN()).save(str(path))
    src = trained_like(7)
    ckpt = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(ckpt))
    loaded = load_model(str(path), ckpt)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), src.eval()(x), atol=1e-5)

