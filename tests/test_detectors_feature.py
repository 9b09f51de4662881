"""Feature-based detectors (detectors/feature/) against independent float64 implementations of
their papers' formulas (numpy / scikit-learn), hand-worked examples with the sign convention,
streaming and merged fits, saved state, and degenerate data."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

import ebood
from ebood import detectors
from ebood.detectors import MissingFieldError
from ebood.detectors.feature import ViM

FEATURE_DETECTORS = ["mahalanobis", "relative_mahalanobis", "vim", "residual", "knn", "she", "fdbd", "nnguide", "conjnorm"]
SMALL = {"vim": {"dim": 6}, "residual": {"dim": 6}, "knn": {"k": 5}, "nnguide": {"k": 7}}


def make(name: str, **params):
    return detectors.create(name, **{**SMALL.get(name, {}), **params})


def random_outputs(seed: int, n: int, d: int = 16, c: int = 4, dtype=torch.float64, shift: float = 0.0) -> ebood.Outputs:
    """Class-structured Gaussian features (correlated), a fixed head, logits = head(features)."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(c, d, generator=torch.Generator().manual_seed(100), dtype=torch.float64) + 1.0
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(101), dtype=torch.float64) / math.sqrt(d) + 0.5 * torch.eye(d, dtype=torch.float64)
    labels = torch.arange(n) % c
    x = means[labels] + torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T + shift
    w = torch.randn(c, d, generator=torch.Generator().manual_seed(102), dtype=torch.float64) / math.sqrt(d) + (means - means.mean(0)) / 3
    b = 0.3 * torch.randn(c, generator=torch.Generator().manual_seed(103), dtype=torch.float64)
    head = ebood.Head(w.to(dtype), b.to(dtype))
    x = x.to(dtype)
    return ebood.Outputs(logits=head(x), features=x, labels=labels, head=head)


def ood_like(seed: int, n: int) -> torch.Tensor:
    """Features pulled halfway to the origin plus wide isotropic noise: unlike the classes."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 * random_outputs(seed, n).features + 2.0 * torch.randn(n, 16, generator=g, dtype=torch.float64)


TRAIN = random_outputs(0, 400)
_TEST_X = torch.cat([random_outputs(1, 60).features, ood_like(2, 60)])  # 60 ID, then 60 OOD-like
TEST = ebood.Outputs(logits=TRAIN.head(_TEST_X), features=_TEST_X, head=TRAIN.head)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def quiet_fit(det, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return det.fit(data)


# ----- float64 references, written from the papers' formulas -------------------------------------


def ref_class_gaussians(x, y, classes):
    mus = {c: x[y == c].mean(axis=0) for c in classes}
    centred = np.concatenate([x[y == c] - mus[c] for c in classes])
    precision = EmpiricalCovariance().fit(centred).precision_  # pinvh, as the paper's LDA fit
    return mus, precision


def ref_mahalanobis(train, test):
    x, y = np64(train.features), train.labels.numpy()
    classes = np.unique(y)
    mus, p = ref_class_gaussians(x, y, classes)
    xt = np64(test.features)
    md = np.stack([np.einsum("nd,de,ne->n", xt - mus[c], p, xt - mus[c]) for c in classes], axis=1)
    return md.min(axis=1)


def ref_relative_mahalanobis(train, test):
    x = np64(train.features)
    background = EmpiricalCovariance().fit(x)
    xt = np64(test.features)
    d0 = xt - background.location_
    md0 = np.einsum("nd,de,ne->n", d0, background.precision_, d0)
    return ref_mahalanobis(train, test) - md0


def ref_principal(train, dim):
    x = np64(train.features)
    w, b = np64(train.head.weight), np64(train.head.bias)
    u = -np.linalg.pinv(w) @ b
    second = (x - u).T @ (x - u) / len(x)
    vals, vecs = np.linalg.eigh(second)
    residual_space = vecs[:, np.argsort(vals)[::-1][dim:]]
    return u, residual_space, w, b


def ref_residual(train, test, dim):
    u, ns, _, _ = ref_principal(train, dim)
    return np.linalg.norm((np64(test.features) - u) @ ns, axis=1)


def ref_vim(train, test, dim):
    u, ns, w, b = ref_principal(train, dim)
    x = np64(train.features)
    alpha = (x @ w.T + b).max(axis=1).mean() / np.linalg.norm((x - u) @ ns, axis=1).mean()
    xt = np64(test.features)
    return alpha * np.linalg.norm((xt - u) @ ns, axis=1) - logsumexp(xt @ w.T + b, axis=1)


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ref_knn(train, test, k):
    bank, queries = unit(np64(train.features)), unit(np64(test.features))
    # sklearn finds the neighbours; their distances are recomputed from differences (sklearn's
    # own distances use the expanded form, inaccurate for near duplicates)
    idx = NearestNeighbors(n_neighbors=k + 3, algorithm="brute").fit(bank).kneighbors(queries)[1]
    dist = np.linalg.norm(queries[:, None, :] - bank[idx], axis=2)
    return np.sort(dist, axis=1)[:, k - 1]


def ref_she(train, test):
    x, z, y = np64(train.features), np64(train.logits), train.labels.numpy()
    pred = z.argmax(axis=1)
    patterns = np.stack([x[(y == c) & (pred == c)].mean(axis=0) for c in range(z.shape[1])])
    zt = np64(test.logits)
    return np.array([-(f @ patterns[p]) for f, p in zip(np64(test.features), zt.argmax(axis=1))])


def ref_fdbd(train, test):
    w, b = np64(train.head.weight), np64(train.head.bias)
    mean = np64(train.features).mean(axis=0)
    out = []
    for f in np64(test.features):
        z = w @ f + b
        top = int(np.argmax(z))
        dists = [abs((w[top] - w[c]) @ f + b[top] - b[c]) / np.linalg.norm(w[top] - w[c]) for c in range(len(b)) if c != top]
        out.append(-np.mean(dists) / np.linalg.norm(f - mean))
    return np.array(out)


def ref_nnguide(train, test, k):
    bank = unit(np64(train.features)) * logsumexp(np64(train.logits), axis=1)[:, None]
    sims = unit(np64(test.features)) @ bank.T
    guidance = -np.sort(-sims, axis=1)[:, :k].mean(axis=1)
    return -(guidance * logsumexp(np64(test.logits), axis=1))


def ref_conjnorm(train, test, p, t):
    q = p / (p - 1)
    pnorm = lambda a: a / np.sum(np.abs(a) ** p, axis=-1, keepdims=True) ** (1 / p)  # noqa: E731
    x, y = np64(train.features), train.labels.numpy()
    classes = np.unique(y)
    protos = pnorm(np.stack([x[y == c].mean(axis=0) for c in classes]))
    qn = np.sum(np.abs(protos) ** q, axis=1, keepdims=True) ** (1 / q)
    grads = protos * np.abs(protos) ** (q - 2) / qn ** (q - 2)  # grad of 1/2 ||mu||_q^2

    def dist(a, g):  # -1/2 ||a||_q^2 + a . grad psi(mu)
        return -0.5 * np.sum(np.abs(a) ** q, axis=1) ** (2 / q) + a @ g

    log_z = np.array([logsumexp(dist(pnorm(x[y == c]), grads[i]) / t) for i, c in enumerate(classes)])
    xt = pnorm(np64(test.features))
    per_class = np.stack([dist(xt, grads[i]) / t - log_z[i] for i in range(len(classes))], axis=1)
    return -logsumexp(per_class, axis=1)


REFERENCES = {
    "mahalanobis": lambda tr, te: ref_mahalanobis(tr, te),
    "relative_mahalanobis": lambda tr, te: ref_relative_mahalanobis(tr, te),
    "vim": lambda tr, te: ref_vim(tr, te, 6),
    "residual": lambda tr, te: ref_residual(tr, te, 6),
    "knn": lambda tr, te: ref_knn(tr, te, 5),
    "she": lambda tr, te: ref_she(tr, te),
    "fdbd": lambda tr, te: ref_fdbd(tr, te),
    "nnguide": lambda tr, te: ref_nnguide(tr, te, 7),
    "conjnorm": lambda tr, te: ref_conjnorm(tr, te, 2.2, 0.05),
}


@pytest.mark.parametrize("name", FEATURE_DETECTORS)
def test_matches_float64_reference(name):
    ours = make(name).fit(TRAIN).score(TEST)
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), REFERENCES[name](TRAIN, TEST), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", FEATURE_DETECTORS)
def test_float32_close_to_reference_and_ood_scores_higher(name):
    train32 = random_outputs(0, 400, dtype=torch.float32)
    test32 = ebood.Outputs(logits=TEST.logits.float(), features=TEST.features.float(), head=train32.head)
    ours = make(name).fit(train32).score(test32)
    assert ours.dtype == torch.float32
    ref = REFERENCES[name](train32, test32)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours.numpy(), ref, rtol=2e-4, atol=2e-5 * scale)
    # the second half of TEST is unlike the training data: it must look more OOD
    assert ebood.metrics.auroc(ours[:60], ours[60:]) > 0.7


@pytest.mark.parametrize("name", FEATURE_DETECTORS)
def test_half_precision_features_give_float32_scores(name):
    train16 = ebood.Outputs(logits=TRAIN.logits.half(), features=TRAIN.features.half(), labels=TRAIN.labels, head=ebood.Head(TRAIN.head.weight.half(), TRAIN.head.bias.half()))
    test16 = ebood.Outputs(logits=TEST.logits.half(), features=TEST.features.half())
    ours = make(name).fit(train16).score(test16)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()


def test_mahalanobis_scoring_is_accurate_where_the_expanded_form_cancels():
    # features far from the origin relative to their spread: x'Px - 2mu'Px + mu'Pmu cancels badly
    train = random_outputs(3, 600, d=32, c=6, dtype=torch.float32, shift=200.0)
    test = random_outputs(4, 200, d=32, c=6, dtype=torch.float32, shift=200.5)
    ref = ref_mahalanobis(train, test)
    ours = detectors.create("mahalanobis").fit(train).score(test).double().numpy()
    assert np.max(np.abs(ours - ref) / ref) < 1e-4
    x, y = np64(train.features), train.labels.numpy()
    mus, p = ref_class_gaussians(x, y, np.unique(y))
    xt = test.features
    mu = torch.tensor(np.stack([mus[c] for c in sorted(mus)]), dtype=torch.float32)
    pt = torch.tensor(p, dtype=torch.float32)
    px = xt @ pt
    expanded = ((px * xt).sum(1, keepdim=True) - 2 * px @ mu.T + ((mu @ pt) * mu).sum(1)).min(1).values.double().numpy()
    assert np.max(np.abs(expanded - ref) / ref) > 100 * np.max(np.abs(ours - ref) / ref)


# ----- worked examples (numbers derived by hand) -------------------------------------------------


def square(center):
    cx, cy = center
    return [[cx + 1, cy], [cx - 1, cy], [cx, cy + 1], [cx, cy - 1]]


def gaussian_example():
    """Class 0 around (0, 0), class 1 around (4, 0), four points each at distance 1 on the axes:
    within-class covariance diag(1/2, 1/2), so the precision is 2 I."""
    x = torch.tensor(square((0, 0)) + square((4, 0)), dtype=torch.float64)
    y = torch.tensor([0] * 4 + [1] * 4)
    return ebood.Outputs(features=x, labels=y)


def test_worked_example_mahalanobis():
    det = detectors.create("mahalanobis").fit(gaussian_example())
    test = ebood.Outputs(features=torch.tensor([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    # 2 * squared Euclidean distance to the nearest class mean
    np.testing.assert_allclose(det.score(test).numpy(), [0.0, 0.5, 8.0, 18.0], rtol=1e-12, atol=1e-12)


def test_worked_example_relative_mahalanobis():
    det = detectors.create("relative_mahalanobis").fit(gaussian_example())
    # background: mean (2, 0), covariance diag(1/2 + 4, 1/2) -> MD_0 = (x1 - 2)^2 / 4.5 + 2 x2^2
    test = ebood.Outputs(features=torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    np.testing.assert_allclose(det.score(test).numpy(), [0 - 4 / 4.5, 8 - 0, 18 - (4 / 4.5 + 18)], rtol=1e-12, atol=1e-12)


def principal_example():
    """Head reads the first two coordinates (u = 0); training points (2,0,+-0.1), (0,2,+-0.1):
    second moment diag(2, 2, 0.01), principal space = first two axes, residual = |x3|,
    mean max-logit 2, mean residual 0.1 -> alpha = 20."""
    x = torch.tensor([[2, 0, 0.1], [2, 0, -0.1], [0, 2, 0.1], [0, 2, -0.1]], dtype=torch.float64)
    head = ebood.Head(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    return ebood.Outputs(logits=head(x), features=x, head=head)


def test_worked_example_vim_and_residual():
    test = ebood.Outputs(features=torch.tensor([[2.0, 0, 0], [2.0, 0, 1.0], [0, 0, 0.5]], dtype=torch.float64))
    vim = detectors.create("vim", dim=2).fit(principal_example())
    lse = math.log(math.exp(2) + 1)
    np.testing.assert_allclose(vim.score(test).numpy(), [-lse, 20 - lse, 20 * 0.5 - math.log(2)], rtol=1e-12)
    residual = detectors.create("residual", dim=2).fit(principal_example())
    np.testing.assert_allclose(residual.score(test).numpy(), [0, 1.0, 0.5], atol=1e-12)


def test_worked_example_knn():
    r = 1 / math.sqrt(2)
    bank = ebood.Outputs(features=torch.tensor([[1.0, 0], [0, 1.0], [r, r]], dtype=torch.float64))
    det = detectors.create("knn", k=2).fit(bank)
    test = ebood.Outputs(features=torch.tensor([[3.0, 0], [-1.0, 0]], dtype=torch.float64))  # ID-like, OOD-like
    # e1: distances 0, sqrt(2 - sqrt 2), sqrt 2 -> 2nd = sqrt(2 - sqrt 2); -e1: 2, sqrt 2, sqrt(2 + sqrt 2)
    np.testing.assert_allclose(det.score(test).numpy(), [math.sqrt(2 - math.sqrt(2)), math.sqrt(2 + math.sqrt(2))], rtol=1e-12)


def test_worked_example_she():
    x = torch.tensor([[1.0, 0], [3.0, 0], [0, 2.0], [1.0, 1.5]], dtype=torch.float64)
    # the last sample (label 0) is predicted as class 1: it is not stored in any pattern
    train = ebood.Outputs(logits=x, features=x, labels=torch.tensor([0, 0, 1, 0]))
    det = detectors.create("she").fit(train)  # patterns: class 0 -> (2, 0), class 1 -> (0, 2)
    test = torch.tensor([[3.0, 0], [0.1, 0.05], [0, 1.0]], dtype=torch.float64)
    np.testing.assert_allclose(det.score(ebood.Outputs(logits=test, features=test)).numpy(), [-6.0, -0.2, -2.0], rtol=1e-12)


def test_worked_example_fdbd():
    head = ebood.Head(torch.tensor([[1.0, 0], [-1.0, 0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    x = torch.tensor([[1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0]], dtype=torch.float64)  # mean (0, 0)
    det = detectors.create("fdbd").fit(ebood.Outputs(features=x, head=head))
    # boundary x1 = 0: distance |x1|, normalised by ||x - 0||
    test = ebood.Outputs(features=torch.tensor([[2.0, 0], [0.1, 1.0]], dtype=torch.float64))
    np.testing.assert_allclose(det.score(test).numpy(), [-1.0, -0.1 / math.sqrt(1.01)], rtol=1e-12)


def test_worked_example_nnguide():
    x = torch.tensor([[2.0, 0], [0, 1.0]], dtype=torch.float64)
    z = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)  # logsumexp: log 4, log 2
    det = detectors.create("nnguide", k=1).fit(ebood.Outputs(logits=z, features=x))
    # guide bank: (log 4, 0), (0, log 2); a query e1 with logsumexp log 2 -> -(log 4 * log 2)
    test = ebood.Outputs(logits=torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64), features=torch.tensor([[5.0, 0], [0, 1.0]], dtype=torch.float64))
    np.testing.assert_allclose(det.score(test).numpy(), [-math.log(4) * math.log(2), -math.log(2) * math.log(2)], rtol=1e-12)


def test_worked_example_conjnorm_p2():
    # p = q = 2: prototypes e1, e2, d(x, k) = x.mu_k - 1/2, log Z_k = log 2 + 0.5 / T
    x = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0]], dtype=torch.float64)
    det = detectors.create("conjnorm", p=2.0, temperature=0.5).fit(ebood.Outputs(features=x, labels=torch.tensor([0, 0, 1, 1])))
    test = ebood.Outputs(features=torch.tensor([[1.0, 0], [1.0, 1.0]], dtype=torch.float64))
    r = 1 / math.sqrt(2)
    expected = [math.log(2) - math.log(1 + math.exp(-2.0)), (1 - r) / 0.5]
    np.testing.assert_allclose(det.score(test).numpy(), expected, rtol=1e-12)
    assert expected[1] > expected[0]  # between the classes = more OOD


# ----- streaming, merge, save / load -------------------------------------------------------------

STREAMING = [n for n in FEATURE_DETECTORS if detectors.get(n).streaming]


def test_which_detectors_stream():
    assert set(STREAMING) == set(FEATURE_DETECTORS) - {"conjnorm"}


@pytest.mark.parametrize("name", STREAMING)
@pytest.mark.parametrize("batch", [1, 33, 150])
def test_streaming_fit_equals_full_fit(name, batch):
    train = TRAIN.select(slice(0, 60)) if batch == 1 else TRAIN
    full = make(name).fit(train).score(TEST)
    streamed = make(name).fit(train.batches(batch)).score(TEST)
    torch.testing.assert_close(streamed, full, rtol=1e-9, atol=1e-10)
    det = make(name)
    for part in train.batches(batch):
        det.partial_fit(part)
    torch.testing.assert_close(det.score(TEST), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", STREAMING)
def test_merge_equals_full_fit_in_any_order(name):
    full = make(name).fit(TRAIN).score(TEST)
    parts = [TRAIN.select(slice(0, 90)), TRAIN.select(slice(90, 91)), TRAIN.select(slice(91, 300)), TRAIN.select(slice(300, None))]
    fits = [make(name).fit(p) for p in parts]
    merged = make(name)
    for f in reversed(fits):
        merged.merge(f)
    torch.testing.assert_close(merged.score(TEST), full, rtol=1e-9, atol=1e-10)
    tree = make(name).fit(parts[0]).merge(make(name).fit(parts[1])).merge(make(name).fit(parts[2]).merge(make(name).fit(parts[3])))
    torch.testing.assert_close(tree.score(TEST), full, rtol=1e-9, atol=1e-10)


def test_vim_alpha_sample_is_the_same_whatever_the_split(monkeypatch):
    monkeypatch.setattr(ViM, "ALPHA_SAMPLE", 50)
    full = make("vim").fit(TRAIN)
    merged = make("vim").fit(TRAIN.select(slice(200, None))).merge(make("vim").fit(TRAIN.select(slice(0, 200)).batches(17)))
    torch.testing.assert_close(merged.score(TEST), full.score(TEST), rtol=1e-9, atol=1e-10)
    assert torch.equal(merged.alpha_sample_, full.alpha_sample_)  # pruned to 50 rows when finalised
    # the sample is made of distinct training rows, and alpha is the paper's ratio over it
    x = np64(TRAIN.features)
    sample = np64(full.alpha_sample_)
    assert sample.shape == (50, x.shape[1])
    assert all(np.any(np.all(x == row, axis=1)) for row in sample) and len(np.unique(sample, axis=0)) == 50
    u, ns, w, b = ref_principal(TRAIN, 6)
    alpha = (x @ w.T + b).max(axis=1).mean() / np.linalg.norm((sample - u) @ ns, axis=1).mean()
    assert full._alpha == pytest.approx(alpha, rel=1e-10)


def test_fit_from_a_generator_does_not_keep_the_batches():
    seen = []

    def batches():
        for part in TRAIN.batches(50):
            seen.append(part)
            yield part

    det = detectors.create("mahalanobis").fit(batches())
    assert len(seen) == 8
    state = [v for v in vars(det).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in state) < TRAIN.features.numel() / 4  # sums, not the data


@pytest.mark.parametrize("name", FEATURE_DETECTORS)
def test_save_load_gives_identical_scores(name, tmp_path):
    det = make(name).fit(TRAIN)
    loaded = ebood.load(det.save(tmp_path / f"{name}.safetensors"))
    assert torch.equal(loaded.score(TEST), det.score(TEST))


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_knn_approximate_index_saves_and_stays_close_to_exact(index, tmp_path):
    train = random_outputs(5, 3000, d=16, dtype=torch.float32)
    det = detectors.create("knn", k=10, index=index).fit(train)
    exact = detectors.create("knn", k=10).fit(train).score(TEST)
    approx = det.score(TEST)
    assert bool((approx >= exact * (1 - 1e-6)).all())  # candidates are a subset: never closer
    assert float(((approx - exact).abs() / exact).mean()) < 0.05
    loaded = ebood.load(det.save(tmp_path / "knn.safetensors"))
    assert torch.equal(loaded.score(TEST), approx)


def near_duplicates(dtype, scale):
    g = torch.Generator().manual_seed(9)
    bank = torch.randn(500, 32, generator=g, dtype=torch.float64) + 0.3
    bank[250:300] = bank[:50] + scale * torch.randn(50, 32, generator=g, dtype=torch.float64)
    queries = bank[:80] + 0.1 * scale * torch.randn(80, 32, generator=g, dtype=torch.float64)
    return ebood.Outputs(features=bank.to(dtype)), ebood.Outputs(features=queries.to(dtype))


@pytest.mark.parametrize("k", [1, 2, 3, 20])
def test_knn_distance_has_no_cancellation_for_near_duplicates(k):
    # float64: neighbours 1e-9 apart (2 - 2 a.b would keep no digit of their distance in float32)
    bank, queries = near_duplicates(torch.float64, 1e-8)
    ours = detectors.create("knn", k=k).fit(bank).score(queries)
    np.testing.assert_allclose(ours.numpy(), ref_knn(bank, queries, k), rtol=1e-6)
    # float32: exact for the stored float32 unit vectors (their rounding is the only error left)
    bank, queries = near_duplicates(torch.float32, 1e-3)
    det = detectors.create("knn", k=k).fit(bank)
    ours = det.score(queries)
    unit_queries = torch.nn.functional.normalize(queries.features, dim=1)
    ref = ref_knn(ebood.Outputs(features=det.bank_.double()), ebood.Outputs(features=unit_queries.double()), k)
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5)


def test_knn_resolves_ties_in_similarity_by_exact_distance():
    # 200 bank rows at angles 1e-3 * (1 + j/200) from the query: in float32 their similarities
    # cos(angle) all round to the same few values, their distances (about the angle) do not
    g = torch.Generator().manual_seed(4)
    d = 24
    query = torch.zeros(d, dtype=torch.float64)
    query[0] = 1.0
    angles = 1e-3 * (1 + torch.randperm(200, generator=g).double() / 200)
    others = torch.randn(200, d, generator=g, dtype=torch.float64)
    others[:, 0] = 0
    others = others / others.norm(dim=1, keepdim=True)
    near = torch.cos(angles)[:, None] * query + torch.sin(angles)[:, None] * others
    far = torch.randn(100, d, generator=g, dtype=torch.float64)
    bank = torch.cat([near, far]).float()
    for k in (1, 50, 150):
        det = detectors.create("knn", k=k).fit(ebood.Outputs(features=bank))
        ours = det.score(ebood.Outputs(features=query[None].float()))
        ref = np.sort(np.linalg.norm(np64(det.bank_) - np64(query), axis=1))[k - 1]
        assert float(ours[0]) == pytest.approx(ref, rel=1e-5)
        assert float(ours[0]) == pytest.approx(float(torch.sort(angles).values[k - 1]), rel=2e-3)


# ----- degenerate data ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis", "conjnorm"])
def test_class_without_samples_is_left_out_with_a_warning(name):
    keep = TRAIN.labels != 2
    train = ebood.Outputs(logits=TRAIN.logits[keep], features=TRAIN.features[keep], labels=TRAIN.labels[keep], head=TRAIN.head)
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[2\] have no training samples"):
        scores = make(name).fit(train).score(TEST)  # streaming fits finalise (and warn) lazily
    np.testing.assert_allclose(scores.numpy(), REFERENCES[name](train, TEST), rtol=1e-8, atol=1e-9)


def test_she_class_without_samples_warns_and_refuses_samples_predicted_as_it(tmp_path):
    keep = TRAIN.labels != 3
    train = ebood.Outputs(logits=TRAIN.logits[keep], features=TRAIN.features[keep], labels=TRAIN.labels[keep])
    det = detectors.create("she").fit(train)
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[3\] have no training samples"):
        det.save(tmp_path / "she.safetensors")  # finalising warns
    pred = TEST.logits.argmax(1)
    ok = pred != 3
    fine = ebood.Outputs(logits=TEST.logits[ok], features=TEST.features[ok])
    assert torch.isfinite(det.score(fine)).all()
    with pytest.raises(ValueError, match=r"predicted as class\(es\) \[3\]"):
        det.score(TEST)


def test_she_class_never_classified_correctly_uses_its_labelled_mean():
    z = TRAIN.logits.clone()
    z[TRAIN.labels == 1, 1] = -100.0  # no class-1 sample is predicted as class 1
    train = ebood.Outputs(logits=z, features=TRAIN.features, labels=TRAIN.labels)
    det = detectors.create("she").fit(train)
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[1\] is classified correctly"):
        det.score(TEST)
    x = np64(TRAIN.features)
    assert np.allclose(np64(det._patterns[1]), x[TRAIN.labels.numpy() == 1].mean(axis=0))


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis", "she", "conjnorm"])
def test_labels_outside_the_classes_are_named(name):
    bad = TRAIN.labels.clone()
    bad[5], bad[9] = 4, 7  # the logits have 4 classes
    with pytest.raises(ValueError, match=r"labels must be class indices in 0\.\.3.*got label\(s\) 4, 7"):
        make(name).fit(ebood.Outputs(logits=TRAIN.logits, features=TRAIN.features, labels=bad, head=TRAIN.head))
    bad[5] = -1
    with pytest.raises(ValueError, match=r"got label\(s\) -1, 7"):
        make(name).fit(ebood.Outputs(logits=TRAIN.logits, features=TRAIN.features, labels=bad, head=TRAIN.head))


def test_labels_without_logits_may_grow_but_not_go_negative():
    train = ebood.Outputs(features=TRAIN.features, labels=TRAIN.labels)
    det = detectors.create("mahalanobis").fit(train)
    np.testing.assert_allclose(det.score(TEST).numpy(), ref_mahalanobis(train, TEST), rtol=1e-8)
    with pytest.raises(ValueError, match=r"class indices >= 0; got label\(s\) -3"):
        detectors.create("mahalanobis").fit(ebood.Outputs(features=TRAIN.features[:3], labels=torch.tensor([0, -3, 1])))


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis"])
def test_fewer_samples_than_dimensions_use_the_pseudo_inverse(name):
    train = random_outputs(6, 12, d=20, c=2)
    test = random_outputs(7, 30, d=20, c=2)
    with pytest.warns(RuntimeWarning, match="singular"):
        scores = detectors.create(name).fit(train).score(test)
    assert torch.isfinite(scores).all()
    np.testing.assert_allclose(scores.numpy(), REFERENCES[name](train, test), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis"])
def test_constant_features_use_the_pseudo_inverse(name):
    x = TRAIN.features.clone()
    x[:, 3] = 5.0
    train = ebood.Outputs(features=x, labels=TRAIN.labels)
    with pytest.warns(RuntimeWarning, match=r"singular \(rank 15 of 16"):
        scores = detectors.create(name).fit(train).score(TEST)
    assert torch.isfinite(scores).all()
    np.testing.assert_allclose(scores.numpy(), REFERENCES[name](train, TEST), rtol=1e-6, atol=1e-8)


def test_identical_features_are_an_error():
    train = ebood.Outputs(features=torch.ones(10, 4, dtype=torch.float64), labels=torch.arange(10) % 2)
    with pytest.raises(ValueError, match="covariance is zero"):
        detectors.create("mahalanobis").fit(train).score(TEST)


@pytest.mark.parametrize("name", ["vim", "residual"])
def test_principal_dimension_must_leave_a_residual(name):
    with pytest.raises(ValueError, match="dim=16 must be smaller than the feature dimension 16"):
        detectors.create(name, dim=16).fit(TRAIN)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        detectors.create(name, dim=0)
    # default: the official rule, D / 2 below 768
    det = detectors.create(name).fit(TRAIN)
    np.testing.assert_allclose(det.score(TEST).numpy(), (ref_vim if name == "vim" else ref_residual)(TRAIN, TEST, 8), rtol=1e-8, atol=1e-9)


def test_vim_without_residual_variance_is_an_error():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(50, 2, generator=g, dtype=torch.float64), torch.zeros(50, 2, dtype=torch.float64)], dim=1)
    head = ebood.Head(torch.eye(4, dtype=torch.float64)[:3], torch.zeros(3, dtype=torch.float64))
    det = detectors.create("vim", dim=2).fit(ebood.Outputs(features=x, head=head))
    with pytest.raises(ValueError, match="no residual outside the principal space"):
        det.score(ebood.Outputs(features=x))


@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_k_larger_than_the_bank_is_an_error(name):
    small = TRAIN.select(slice(0, 4))
    det = detectors.create(name, k=5).fit(small)
    with pytest.raises(ValueError, match=r"k=5 is larger than the bank of 4 training samples"):
        det.score(TEST)
    # a partial fit that small can still be merged into a usable one
    det.merge(detectors.create(name, k=5).fit(TRAIN.select(slice(4, None))))
    torch.testing.assert_close(det.score(TEST), detectors.create(name, k=5).fit(TRAIN).score(TEST))


def test_fdbd_identical_head_rows_are_left_out():
    w = TRAIN.head.weight.clone()
    w[2] = w[1]
    b = TRAIN.head.bias.clone()
    b[2] = b[1] + 0.5
    head = ebood.Head(w, b)
    train = ebood.Outputs(features=TRAIN.features, head=head)
    with pytest.warns(RuntimeWarning, match=r"classes \[\[1, 2\]\] are identical"):
        scores = detectors.create("fdbd").fit(train).score(ebood.Outputs(features=TEST.features))
    assert torch.isfinite(scores).all()
    # reference: the average over the other classes that have a boundary with the predicted one
    mean = np64(TRAIN.features).mean(axis=0)
    wn, bn = np64(w), np64(b)
    for f, s in zip(np64(TEST.features)[:20], scores[:20].numpy()):
        z = wn @ f + bn
        top = int(np.argmax(z))
        ds = [abs(z[top] - z[c]) / np.linalg.norm(wn[top] - wn[c]) for c in range(4) if c != top and not np.array_equal(wn[c], wn[top])]
        assert s == pytest.approx(-np.mean(ds) / np.linalg.norm(f - mean), rel=1e-9)


def test_fdbd_needs_two_classes_and_survives_the_training_mean():
    with pytest.raises(ValueError, match="at least 2 classes"):
        detectors.create("fdbd").fit(ebood.Outputs(features=TRAIN.features, head=ebood.Head(TRAIN.head.weight[:1], TRAIN.head.bias[:1])))
    det = detectors.create("fdbd").fit(TRAIN)
    at_mean = TRAIN.features.mean(0, keepdim=True)
    assert torch.isfinite(det.score(ebood.Outputs(features=at_mean.float()))).all()
    assert torch.isfinite(det.score(ebood.Outputs(features=det._mean[None]))).all()


@pytest.mark.parametrize("name", FEATURE_DETECTORS)
def test_non_finite_features_are_an_error_not_nan_scores(name):
    bad = TRAIN.features.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"features has non-finite values .* first at index 7"):
        make(name).fit(ebood.Outputs(logits=TRAIN.logits, features=bad, labels=TRAIN.labels, head=TRAIN.head))
    det = make(name).fit(TRAIN)
    tbad = TEST.features.clone()
    tbad[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite"):
        det.score(ebood.Outputs(logits=TEST.logits, features=tbad))


@pytest.mark.parametrize("name", FEATURE_DETECTORS)
def test_missing_fields_are_named(name):
    cls = detectors.get(name)
    full = {"logits": TRAIN.logits, "features": TRAIN.features, "labels": TRAIN.labels, "head": TRAIN.head}
    for field in set(cls.requires + cls.fit_requires):
        with pytest.raises(MissingFieldError, match=f"Outputs.{field}"):
            make(name).fit(ebood.Outputs(**{k: v for k, v in full.items() if k != field}))
    det = make(name).fit(TRAIN)
    for field in cls.requires:
        with pytest.raises(MissingFieldError, match=f"Outputs.{field}"):
            det.score(ebood.Outputs(**{k: v for k, v in {"logits": TEST.logits, "features": TEST.features}.items() if k != field}))


@pytest.mark.parametrize("name", FEATURE_DETECTORS)
def test_wrong_feature_dimension_is_named(name):
    det = make(name).fit(TRAIN)
    with pytest.raises(ValueError, match="dimension 15"):
        det.score(ebood.Outputs(logits=TEST.logits, features=TEST.features[:, :15]))


def test_hyperparameters_are_checked():
    for name, params, message in [
        ("knn", {"k": 0}, "k must be an integer >= 1"),
        ("knn", {"index": "lsh"}, "unknown index 'lsh'"),
        ("nnguide", {"k": 2.5}, "k must be an integer"),
        ("conjnorm", {"p": 1.0}, "p must be a finite number > 1"),
        ("conjnorm", {"temperature": 0}, "temperature must be a finite number > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            detectors.create(name, **params)


def test_scoring_with_a_different_head_is_refused():
    det = make("vim").fit(TRAIN)
    other = ebood.Head(TRAIN.head.weight + 1, TRAIN.head.bias)
    with pytest.raises(ValueError, match="different head"):
        det.score(ebood.Outputs(features=TEST.features, head=other))


@pytest.mark.parametrize("name", FEATURE_DETECTORS)
def test_inputs_are_left_unchanged(name):
    train, test = random_outputs(0, 120), random_outputs(1, 30)
    copies = [t.clone() for t in (train.features, train.logits, train.labels, train.head.weight, test.features)]
    make(name).fit(train).score(test)
    for before, after in zip(copies, (train.features, train.logits, train.labels, train.head.weight, test.features)):
        assert torch.equal(before, after)


def test_ivf_search_probing_every_list_is_exact_and_state_is_checked():
    from ebood.detectors import _linalg as la

    g = torch.Generator().manual_seed(11)
    bank = la.normalise_rows(torch.randn(600, 16, generator=g) + torch.randn(8, 16, generator=g).repeat(75, 1))
    queries = la.normalise_rows(torch.randn(40, 16, generator=g))
    centroids, lists = la.ivf_lists(bank, 8)
    order = torch.argsort(lists, stable=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.bincount(lists, minlength=8), 0)])
    values, index = la.ivf_top_k(queries, bank[order], centroids, offsets, nprobe=8, k=12)
    ref = torch.topk(queries @ bank[order].T, 12, dim=1)
    torch.testing.assert_close(values, ref.values)
    assert torch.equal(index.sort(dim=1).values, ref.indices.sort(dim=1).values)
    det = detectors.create("knn", k=5, index="ivf").fit(ebood.Outputs(features=bank))
    det.score(ebood.Outputs(features=queries))
    det.ivf_offsets_[-1] += 1
    with pytest.raises(ValueError, match="ivf_offsets_ must rise from 0 to the bank size 600"):
        det._check_state()
