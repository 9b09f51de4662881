"""Feature-based detectors: ebood against the peers' way of computing the same scores, in one run.

Synthetic penultimate features (deterministic): C Gaussian classes in D dimensions with a shared
covariance whose eigenvalues span two decades, class means offset from the origin (like post-ReLU
features), a head ``W`` from the class means, ``logits = x W^T + b``; N_train training samples
and N_test test samples (half ID, half OOD: a shifted and wider Gaussian).

For every detector of ``detectors/feature/`` the baseline re-implements the peer's way from its
published formulas (pytorch-ood 0.4.0 where it has the method, else OpenOOD v1.5 / the official
code): per-class loops for Mahalanobis / RMD (one (N, D) x (D, D) product per class), numpy +
sklearn ``EmpiricalCovariance`` + ``np.linalg.eig`` for ViM / Residual, sklearn
``NearestNeighbors`` brute force for KNN, faiss ``IndexFlatIP`` for NNGuide, numpy float64 for
ConjNorm, the OpenOOD torch code for SHE / fDBD. Every time is the fastest of ``--repeats`` runs.

Also printed:
* Mahalanobis (C classes): relative error of ebood's float32 scores, of the expanded quadratic
  form and of the per-class loop against a float64 numpy reference;
* KNN (k = 50): exact search time against the bare product ``test @ bank.T`` in the same run, and
  the approximate modes (faiss IVF / HNSW): speed-up over exact, the share of test samples whose
  k-th neighbour distance they recover exactly (rel. tol. 1e-5) and the mean relative error of
  that distance.

    python benchmarks/detectors.py               # D = 512, 50000 train, 10000 test, C = 100
    python benchmarks/detectors.py --quick       # small smoke run
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

import ebood
from ebood import detectors
from ebood.metrics import auroc


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


# ----- data -------------------------------------------------------------------------------------


def make_data(n_train: int, n_test: int, d: int, c: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -2, d, dtype=torch.float64)
    mix = (q * spectrum.sqrt()).float()  # covariance Q diag(s) Q^T
    means = 2.0 + 0.6 * torch.randn(c, d, generator=g)
    y_train = torch.randint(0, c, (n_train,), generator=g)
    x_train = means[y_train] + torch.randn(n_train, d, generator=g) @ mix.T
    n_id = n_test // 2
    y_id = torch.randint(0, c, (n_id,), generator=g)
    x_id = means[y_id] + torch.randn(n_id, d, generator=g) @ mix.T
    ood_means = 2.0 + 0.6 * torch.randn(c, d, generator=g)
    y_ood = torch.randint(0, c, (n_test - n_id,), generator=g)
    x_ood = 0.5 * means[y_ood] + 0.5 * ood_means[y_ood] + 1.5 * torch.randn(n_test - n_id, d, generator=g) @ mix.T
    centred = means - means.mean(0) + 0.05 * torch.randn(c, d, generator=g)
    w = centred / centred.norm(dim=1, keepdim=True) * 4.0
    b = 0.1 * torch.randn(c, generator=g)
    head = ebood.Head(w, b)
    x_test = torch.cat([x_id, x_ood])
    train = ebood.Outputs(logits=head(x_train), features=x_train, labels=y_train, head=head)
    test = ebood.Outputs(logits=head(x_test), features=x_test, head=head)
    return {"train": train, "test": test, "n_id": n_id}


# ----- baselines (the peers' way, from their published formulas) -------------------------------


def md_fit_loop(x: torch.Tensor, y: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch-ood Mahalanobis.fit_features: class means and the summed class scatter, per class."""
    mu = torch.zeros(c, x.shape[1])
    cov = torch.zeros(x.shape[1], x.shape[1])
    for k in range(c):
        xs = x[y == k]
        mu[k] = xs.mean(dim=0)
        cov += (xs - mu[k]).T @ (xs - mu[k])
    cov /= x.shape[0]
    return mu, torch.linalg.pinv(cov)


def md_score_loop(x: torch.Tensor, mu: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """pytorch-ood Mahalanobis: one (N, D) x (D, D) product per class, then the minimum."""
    dist = torch.empty(x.shape[0], mu.shape[0])
    for k in range(mu.shape[0]):
        d = x - mu[k]
        dist[:, k] = ((d @ precision) * d).sum(dim=1)
    return dist.min(dim=1).values


def md_score_expanded(x: torch.Tensor, mu: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """One product with the precision, one with the class means: x'Px - 2 mu'Px + mu'P mu."""
    px = x @ precision
    quad = (px * x).sum(dim=1, keepdim=True)
    cross = px @ mu.T
    const = ((mu @ precision) * mu).sum(dim=1)
    return (quad - 2 * cross + const).min(dim=1).values


def rmd_fit_loop(x: torch.Tensor, y: torch.Tensor, c: int):
    mu, precision = md_fit_loop(x, y, c)
    mean = x.mean(dim=0)
    cov0 = (x - mean).T @ (x - mean) / x.shape[0]
    return mu, precision, mean, torch.linalg.pinv(cov0)


def rmd_score_loop(x, mu, precision, mean, precision0):
    d0 = x - mean
    return md_score_loop(x, mu, precision) - ((d0 @ precision0) * d0).sum(dim=1)


def vim_fit_numpy(x: np.ndarray, w: np.ndarray, b: np.ndarray, dim: int, with_alpha: bool):
    """The official ViM code (numpy, sklearn EmpiricalCovariance, np.linalg.eig)."""
    from sklearn.covariance import EmpiricalCovariance

    u = -np.matmul(np.linalg.pinv(w), b)
    ec = EmpiricalCovariance(assume_centered=True)
    ec.fit(x - u)
    vals, vecs = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((vecs.T[np.argsort(vals * -1)[dim:]]).T)
    alpha = None
    if with_alpha:
        logits = x @ w.T + b
        alpha = logits.max(axis=-1).mean() / np.linalg.norm(np.matmul(x - u, ns), axis=-1).mean()
    return u, ns, alpha


def vim_score_numpy(x, w, b, u, ns, alpha):
    from scipy.special import logsumexp

    residual = np.linalg.norm(np.matmul(x - u, ns), axis=-1)
    if alpha is None:
        return residual
    return alpha * residual - logsumexp(x @ w.T + b, axis=-1)


def normalise_np(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10)


def knn_sklearn(bank: np.ndarray, queries: np.ndarray, k: int):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=-1).fit(normalise_np(bank))
    return nn.kneighbors(normalise_np(queries))[0][:, -1]


def she_fit_torch(x, y, w, b, c):
    """pytorch-ood SHE.fit_features: keep correctly classified samples (head logits), class means."""
    keep_z, keep_y = [], []
    for start in range(0, x.shape[0], 1024):
        zb, yb = x[start : start + 1024], y[start : start + 1024]
        mask = (zb @ w.T + b).argmax(dim=1) == yb
        keep_z.append(zb[mask])
        keep_y.append(yb[mask])
    z, yy = torch.cat(keep_z), torch.cat(keep_y)
    return torch.stack([z[yy == k].mean(dim=0) for k in range(c)])


def she_score_torch(x, w, b, patterns):
    return -torch.sum(torch.mul(x, patterns[(x @ w.T + b).argmax(dim=1)]), dim=1)


def fdbd_fit_openood(x: np.ndarray, w: np.ndarray):
    mean = torch.from_numpy(np.mean(x, axis=0))
    c = w.shape[0]
    den = np.zeros((c, c))
    for p in range(c):
        d = np.linalg.norm(w - w[p, :], axis=1)
        d[p] = 1
        den[p, :] = d
    return mean, torch.tensor(den)


def fdbd_score_openood(x, w, b, mean, den):
    logits = x @ w.T + b  # the network's fc layer, run by OpenOOD's net(data) before postprocessing
    values, idx = logits.max(1)
    sub = torch.abs(logits - values.repeat(logits.shape[1], 1).T)
    return -(torch.sum(sub / den[idx], axis=1) / torch.norm(x - mean, dim=1))


def nnguide_fit_openood(x: np.ndarray, logits: np.ndarray):
    from scipy.special import logsumexp

    return normalise_np(x) * logsumexp(logits, axis=-1)[:, None]


def nnguide_score_openood(bank: np.ndarray, x: np.ndarray, logits: np.ndarray, k: int):
    import faiss
    from scipy.special import logsumexp

    index = faiss.IndexFlatIP(bank.shape[-1])
    index.add(np.ascontiguousarray(bank.astype(np.float32)))
    sims, _ = index.search(np.ascontiguousarray(normalise_np(x).astype(np.float32)), k)
    return -(sims.mean(axis=1) * logsumexp(logits, axis=-1))


def _conj_tools(p: float):
    q = 1 / (1 - 1 / p)

    def norm(a):
        return a / (np.linalg.norm(a, ord=p, axis=-1, keepdims=True) + 1e-10)

    def dist(a, b):
        # b: prototypes as rows (K, D). The official code passes them transposed, (D, K), so its
        # norm over axis -1 runs across classes; here it is each prototype's own q-norm (the
        # gradient of 1/2 ||mu||_q^2, the paper's formula). The cost is the same.
        return -0.5 * (np.linalg.norm(a, ord=q, axis=-1, keepdims=True) + 1e-10) ** 2 + np.dot(
            a, (b * np.abs(b) ** (q - 2) / (np.linalg.norm(b, ord=q, axis=-1, keepdims=True) + 1e-10) ** (q - 2)).T
        )

    return norm, dist


def conjnorm_fit_official(x_train: np.ndarray, y_train: np.ndarray, c: int, p: float, t: float):
    """The official ConjNorm code (ImageNet script): numpy float64, per-class partition sums."""
    norm, dist = _conj_tools(p)
    x_train = x_train.astype(np.float64)
    protos = norm(np.stack([x_train[y_train == k].mean(axis=0) for k in range(c)]))
    z = np.zeros(c)
    for k in range(c):
        z[k] = np.sum(np.exp(dist(norm(x_train[y_train == k]), protos[k : k + 1]) / t))
    return protos, z


def conjnorm_score_official(x_test: np.ndarray, protos: np.ndarray, z: np.ndarray, p: float, t: float):
    norm, dist = _conj_tools(p)
    s = np.exp(dist(norm(x_test.astype(np.float64)), protos) / t) / z
    return -np.log(np.sum(s, axis=1))


# ----- runs -------------------------------------------------------------------------------------


def fit_final(name: str, params: dict, train):
    """``fit`` plus the derivation of what scoring needs, which streaming fits do lazily."""
    det = detectors.create(name, **params).fit(train)
    det._ensure_final()
    return det


def run_ebood(name: str, params: dict, train, test, repeats: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_fit, det = best_time(lambda: fit_final(name, params, train), repeats)
    t_score, scores = best_time(lambda: det.score(test), repeats)
    return t_fit, t_score, det, scores


def baseline(name: str, data: dict, params: dict, repeats: int):
    train, test = data["train"], data["test"]
    x, y, z = train.features, train.labels, train.logits
    xt, zt = test.features, test.logits
    c = z.shape[1]
    w, b = train.head.weight, train.head.bias
    if name == "mahalanobis":
        tf, (mu, prec) = best_time(lambda: md_fit_loop(x, y, c), repeats)
        ts, s = best_time(lambda: md_score_loop(xt, mu, prec), repeats)
    elif name == "relative_mahalanobis":
        tf, st = best_time(lambda: rmd_fit_loop(x, y, c), repeats)
        ts, s = best_time(lambda: rmd_score_loop(xt, *st), repeats)
    elif name in ("vim", "residual"):
        dim = params["dim"]
        xn, wn, bn, xtn = x.numpy(), w.numpy(), b.numpy(), xt.numpy()
        tf, st = best_time(lambda: vim_fit_numpy(xn, wn, bn, dim, name == "vim"), repeats)
        ts, s = best_time(lambda: vim_score_numpy(xtn, wn, bn, *st), repeats)
    elif name == "knn":
        xn, xtn = x.numpy(), xt.numpy()
        tf, _ = best_time(lambda: normalise_np(xn), repeats)
        ts, s = best_time(lambda: knn_sklearn(xn, xtn, params["k"]), repeats)
    elif name == "she":
        tf, pat = best_time(lambda: she_fit_torch(x, y, w, b, c), repeats)
        ts, s = best_time(lambda: she_score_torch(xt, w, b, pat), repeats)
    elif name == "fdbd":
        tf, st = best_time(lambda: fdbd_fit_openood(x.numpy(), w.numpy()), repeats)
        ts, s = best_time(lambda: fdbd_score_openood(xt, w, b, *st), repeats)
        s = s / (c - 1)  # OpenOOD sums over the other classes, the paper (and ebood) averages
    elif name == "nnguide":
        tf, bank = best_time(lambda: nnguide_fit_openood(x.numpy(), z.numpy()), repeats)
        ts, s = best_time(lambda: nnguide_score_openood(bank, xt.numpy(), zt.numpy(), params["k"]), repeats)
    elif name == "conjnorm":
        p, t = params["p"], params["temperature"]
        tf, st = best_time(lambda: conjnorm_fit_official(x.numpy(), y.numpy(), c, p, t), repeats)
        ts, s = best_time(lambda: conjnorm_score_official(xt.numpy(), *st, p, t), repeats)
    else:
        raise KeyError(name)
    return tf, ts, torch.as_tensor(np.asarray(s))


def mahalanobis_accuracy(data: dict, det, repeats: int) -> list[str]:
    """Relative errors against a float64 numpy reference of the fitted Gaussians."""
    x = data["train"].features.double().numpy()
    y = data["train"].labels.numpy()
    xt = data["test"].features
    c = int(y.max()) + 1
    mu = np.stack([x[y == k].mean(axis=0) for k in range(c)])
    cov = sum(((x[y == k] - mu[k]).T @ (x[y == k] - mu[k])) for k in range(c)) / x.shape[0]
    prec = np.linalg.pinv(cov, hermitian=True)
    xt64 = xt.double().numpy()
    ref = np.min(np.stack([np.einsum("nd,nd->n", (xt64 - mu[k]) @ prec, xt64 - mu[k]) for k in range(c)], axis=1), axis=1)
    mu32, prec32 = torch.from_numpy(mu).float(), torch.from_numpy(prec).float()
    t_loop, loop = best_time(lambda: md_score_loop(xt, mu32, prec32), 1)
    t_exp, expanded = best_time(lambda: md_score_expanded(xt, mu32, prec32), repeats)
    ours = det.score(data["test"]).double().numpy()

    def rel(s) -> float:
        return float(np.max(np.abs(np.asarray(s, dtype=np.float64) - ref) / np.abs(ref)))

    return [
        f"mahalanobis relative error vs float64 (max over {len(ref)} test samples): ebood {rel(ours):.2e}, "
        f"expanded quadratic form {rel(expanded.double().numpy()):.2e} ({t_exp * 1e3:.0f} ms), per-class loop {rel(loop.double().numpy()):.2e}"
    ]


def knn_report(data: dict, k: int, repeats: int, exact_scores: torch.Tensor, t_exact: float) -> list[str]:
    bank = torch.nn.functional.normalize(data["train"].features, dim=1)
    queries = torch.nn.functional.normalize(data["test"].features, dim=1)
    t_product, _ = best_time(lambda: queries @ bank.T, repeats)
    n_id = data["n_id"]
    exact = exact_scores.double()
    lines = [
        f"knn exact (k={k}): {t_exact:.3f} s, bare product test @ bank.T: {t_product:.3f} s, ratio {t_exact / t_product:.2f} (target <= 1.3)",
    ]
    auroc_exact = auroc(exact[:n_id], exact[n_id:])
    for index in ("ivf", "hnsw"):
        t_fit, t_score, _, approx = run_ebood("knn", {"k": k, "index": index}, data["train"], data["test"], repeats)
        approx = approx.double()
        rel = (approx - exact).abs() / exact
        recall = float((rel <= 1e-5).double().mean())
        lines.append(
            f"knn index={index}: fit {t_fit:.2f} s, score {t_score:.3f} s = {t_exact / t_score:.1f}x faster than exact (target >= 5); "
            f"exact k-th distance recovered for {100 * recall:.1f}% of test samples, mean relative error {float(rel.mean()):.2e}; "
            f"AUROC {100 * auroc(approx[:n_id], approx[n_id:]):.2f} vs exact {100 * auroc_exact:.2f}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=50000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="5000 train, 1000 test, D = 128, C = 20, one repeat")
    ap.add_argument("--only", nargs="*", help="detectors to run (default: all nine)")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.dim, args.classes, args.repeats = 5000, 1000, 128, 20, 1
    torch.manual_seed(0)
    data = make_data(args.train, args.test, args.dim, args.classes)
    params = {
        "mahalanobis": {},
        "relative_mahalanobis": {},
        "vim": {"dim": args.dim // 2},
        "residual": {"dim": args.dim // 2},
        "knn": {"k": 50},
        "she": {},
        "fdbd": {},
        "nnguide": {"k": 100},
        "conjnorm": {"p": 2.2, "temperature": 0.05},
    }
    names = args.only or list(params)
    print(f"# ebood {ebood.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.processor() or platform.machine()}")
    print(f"# D = {args.dim}, {args.train} train, {args.test} test, C = {args.classes}; best of {args.repeats}")
    print(f"{'detector':<22}{'fit ebood':>11}{'fit peer':>11}{'ratio':>8}{'score ebood':>13}{'score peer':>12}{'ratio':>8}{'AUROC':>8}{'|Δ|/max|peer|':>15}  peer")
    peers = {
        "mahalanobis": "pytorch-ood per-class loop",
        "relative_mahalanobis": "pytorch-ood per-class loop",
        "vim": "official numpy/sklearn",
        "residual": "official numpy/sklearn",
        "knn": "sklearn brute force",
        "she": "pytorch-ood torch",
        "fdbd": "pytorch-ood / OpenOOD torch",
        "nnguide": "OpenOOD faiss IndexFlatIP",
        "conjnorm": "official numpy float64",
    }
    notes: list[str] = []
    n_id = data["n_id"]
    for name in names:
        tf, ts, det, scores = run_ebood(name, params[name], data["train"], data["test"], args.repeats)
        bf, bs, peer = baseline(name, data, params[name], args.repeats)
        s = scores.double()
        diff = float((s - peer.double()).abs().max() / peer.double().abs().max())
        print(
            f"{name:<22}{tf:>10.3f}s{bf:>10.3f}s{bf / tf:>7.1f}x{ts:>12.3f}s{bs:>11.3f}s{bs / ts:>7.1f}x"
            f"{100 * auroc(s[:n_id], s[n_id:]):>8.2f}{diff:>15.1e}  {peers[name]}"
        )
        if name == "mahalanobis":
            notes += mahalanobis_accuracy(data, det, args.repeats)
        if name == "knn":
            notes += knn_report(data, params["knn"]["k"], args.repeats, scores, ts)
    print("# ratio = peer time / ebood time (> 1: ebood faster); |Δ| = largest difference from the peer's scores")
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
