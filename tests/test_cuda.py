"""The same results on a CUDA device as on the CPU: logit scores, every post-hoc detector, the
model-level detectors, extraction (with and without autocast), the one-pass evaluation and a
fine-tuning run. Skipped where no CUDA device exists (CI has none; run on a GPU machine with
``python -m pytest tests/test_cuda.py``)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import ebood
from ebood import detectors, scores
from ebood.train import EnergyBoundedLoss, finetune

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

C, D = 6, 32


def make_outputs(seed: int, n: int, shift: float = 0.0) -> ebood.Outputs:
    """Class-structured non-negative features, labels, a head, and logits = head(features) (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(C, D, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(n) % C
    features = torch.relu(centres[labels] + 0.5 * torch.randn(n, D, generator=g) + shift)
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(7)) / math.sqrt(D) + (centres - centres.mean(0)) / 2
    b = torch.randn(C, generator=torch.Generator().manual_seed(8)) * 0.1
    head = ebood.Head(w, b)
    return ebood.Outputs(logits=head(features), features=features, labels=labels, head=head)


def on_cuda(o: ebood.Outputs) -> ebood.Outputs:
    return o.to("cuda")


POST_HOC = [n for n in detectors.available() if "model" not in detectors.get(n).requires]
#: the index modes are faiss-cpu structures: exact KNN is what runs on tensors of any device
SMALL = {"dim": 8, "k": 5, "epochs": 5, "n_components": 2}


def make(name: str) -> detectors.Detector:
    params = {k: v for k, v in SMALL.items() if k in detectors.get(name).hyperparameter_names()}
    return detectors.create(name, **params)


# ----- scores ------------------------------------------------------------------------------------


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Both CUDA code paths: the Triton kernel (when Triton is installed) and chunked eager torch."""
    if request.param == "torch":
        monkeypatch.setattr(scores, "_triton_usable", lambda x: False)
    elif not scores._triton_usable(torch.zeros(1, 2, device="cuda")):
        pytest.skip("Triton is not available")
    return request.param


def exact_reference(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 scores, with the max's exact 1 left out of the sums (log1p) as a 50-digit
    computation would keep it."""
    r = x.double()
    m, arg = r.max(-1)
    d = r - m.unsqueeze(-1)
    e = torch.exp(d)
    rest = e.scatter(1, arg.unsqueeze(-1), 0.0).sum(-1)
    return {"energy": -(m + torch.log1p(rest)), "msp": -1.0 / (1.0 + rest), "max_logit": -m,
            "entropy": torch.log1p(rest) - torch.nansum(e * d, -1) / (1.0 + rest), "prediction": arg}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("cols", [1000, 9000])
def test_logit_scores_on_cuda_match_float64_on_the_rounded_inputs(dtype, cols, path):
    x = (torch.randn(3000, cols, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    x[0] = 6.0e4 if dtype == torch.float16 else 1.0e30  # huge and equal: no overflow, msp = -1/C
    x[1, : cols // 2] = -40.0
    x[1, cols - 3 :] = torch.tensor([0.0, -32.0, -33.0])  # confident: entropy ~ 1e-12
    got = scores.logit_scores(x.cuda())
    want = exact_reference(x)
    assert torch.equal(got.pop("prediction").cpu(), want.pop("prediction"))
    for key, w in want.items():
        g = got[key]
        assert g.device.type == "cuda"
        assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        err = ((g.double().cpu() - w).abs() / w.abs().clamp_min(1e-30)).max().item()
        assert err < (1e-10 if dtype == torch.float64 else 1e-5), (key, err)


def test_non_finite_rows_on_cuda_follow_the_exact_limits(path):
    x = torch.randn(6, 5000, generator=torch.Generator().manual_seed(1))
    x[0, 7] = math.nan
    x[1, 4100] = x[1, 4200] = math.inf
    x[2] = -math.inf
    x[3, 4096:] = -math.inf
    got = {k: v.cpu() for k, v in scores.logit_scores(x.cuda()).items()}
    assert all(torch.isnan(got[k][0]) for k in ("energy", "msp", "max_logit", "entropy")) and got["prediction"][0] == 7
    assert got["energy"][1] == -math.inf and got["max_logit"][1] == -math.inf and got["prediction"][1] == 4100
    assert got["msp"][1] == pytest.approx(-0.5) and got["entropy"][1] == pytest.approx(math.log(2))
    assert got["energy"][2] == math.inf and torch.isnan(got["msp"][2]) and torch.isnan(got["entropy"][2])
    want = exact_reference(x[3:])
    for key in ("energy", "msp", "max_logit", "entropy"):
        assert torch.allclose(got[key][3:].double(), want[key], rtol=1e-5), key


def test_large_cuda_logits_need_no_n_by_c_temporary(path):
    x = torch.randn(20000, 8192, device="cuda")  # 625 MiB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    scores.logit_scores(x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= scores.CHUNK_BYTES + 16 * x.shape[0] * 8, f"{extra / 2**20:.0f} MiB extra"


# ----- post-hoc detectors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", POST_HOC)
def test_post_hoc_detector_on_cuda_matches_cpu(name, tmp_path):
    train, test = make_outputs(0, 300), make_outputs(1, 120, shift=0.3)
    cpu = make(name).fit(train)
    gpu = make(name).fit(on_cuda(train))
    want = cpu.score(test).double()
    got = gpu.score(on_cuda(test))
    assert got.device.type == "cuda"
    close = lambda a: torch.allclose(a.double().cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())  # noqa: E731
    assert close(got), name
    # fitted and calibrated on the GPU, saved, loaded and used on a CPU-only deployment
    gpu.calibrate(on_cuda(make_outputs(2, 120)))
    loaded = ebood.load(gpu.save(tmp_path / "det.safetensors"))
    assert close(loaded.score(test)) and loaded.threshold_ == gpu.threshold_


# ----- models ------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.fc1(self.block(x).mean(dim=(2, 3))))))


def images(n: int, seed: int, shift: float = 0.0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g) + shift
    return torch.utils.data.TensorDataset(x, torch.arange(n) % 4)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return SmallNet().eval()


def test_extract_on_cuda_matches_cpu_and_comes_back_on_the_cpu(net):
    data = images(100, 0)
    cpu = ebood.extract(net, data, progress=False)
    gpu = ebood.extract(net, data, device="cuda", progress=False)
    assert gpu.logits.device.type == "cpu" and next(net.parameters()).device.type == "cpu"
    assert torch.allclose(gpu.logits, cpu.logits, atol=1e-4)
    assert torch.allclose(gpu.features, cpu.features, atol=1e-4)
    bf16 = ebood.extract(net, data, device="cuda", amp="bfloat16", progress=False)
    assert bf16.logits.dtype == torch.float32
    assert (bf16.logits - cpu.logits).abs().max() < 0.05 * cpu.logits.abs().max()


@pytest.mark.parametrize("name", ["odin", "gradnorm", "mc_dropout"])
def test_model_detectors_on_cuda_match_cpu(net, name):
    x = images(40, 3).tensors[0]
    params = {"odin": {"temperature": 10.0, "epsilon": 0.002, "std": [0.5, 0.5, 0.5]}, "gradnorm": {},
              "mc_dropout": {"passes": 4, "seed": 0}}[name]
    want = detectors.create(name, **params).score_inputs(net, x)
    got = detectors.create(name, **params).score_inputs(net.cuda(), x.cuda())
    net.cpu()
    if name == "mc_dropout":  # CPU and CUDA draw different dropout masks from the same seed
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert 0 <= got.min() and got.max() <= math.log(4) + 1e-6
    else:
        assert torch.allclose(got.cpu().double(), want.double(), rtol=1e-3, atol=1e-4), (got, want)


def test_evaluate_detectors_on_cuda_matches_cpu(net):
    args = (images(200, 0), images(100, 1), {"shifted": images(100, 2, shift=2.0)})
    names = ["msp", "energy", "mahalanobis", "vim", "knn", "react", "odin"]
    specs = [n if n != "odin" else ("odin", {"temperature": 10.0, "epsilon": 0.001, "std": [1.0, 1.0, 1.0]}) for n in names]
    specs = [s if s not in ("vim", "knn") else (s, {"dim": 8} if s == "vim" else {"k": 5}) for s in specs]
    cpu = ebood.evaluate_detectors(net, *args, specs, progress=False)
    gpu = ebood.evaluate_detectors(net, *args, specs, device="cuda", progress=False)
    on_gpu = ebood.evaluate_detectors(net, *args, specs, device="cuda", result_device="cuda", progress=False)
    for n in names:
        for key in ("auroc", "fpr95"):
            assert gpu.metrics[n]["shifted"][key] == pytest.approx(cpu.metrics[n]["shifted"][key], abs=0.02), (n, key)
            assert on_gpu.metrics[n]["shifted"][key] == pytest.approx(cpu.metrics[n]["shifted"][key], abs=0.02), (n, key)


def test_finetune_on_cuda_lowers_id_energy_relative_to_outliers(tmp_path, net):
    id_data = images(256, 0)
    outliers = torch.utils.data.TensorDataset(torch.rand(512, 3, 8, 8) * 6 - 3)
    model = net.cuda()

    def gap() -> float:
        with torch.no_grad():
            e_in = scores.energy(model(id_data.tensors[0].cuda())).mean()
            e_out = scores.energy(model(outliers.tensors[0].cuda())).mean()
        return float(e_out - e_in)

    before = gap()
    finetune(model, id_data, outliers, EnergyBoundedLoss(m_in=-5.0, m_out=-1.0, weight=1.0), epochs=10, lr=0.1,
             id_batch_size=64, outlier_batch_size=128, device="cuda", checkpoint_dir=tmp_path, progress=False)
    assert next(model.parameters()).device.type == "cuda"
    assert gap() > before
    assert (tmp_path / "epoch-010" / "model.safetensors").is_file()  # checkpoints written from CUDA tensors
    assert np.isfinite(gap())
