"""The field's sample metrics from features, defined as torch-fidelity 0.4 defines them (its defaults), so that
the same features give the same numbers:

- FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^1/2), with the unbiased
  covariance; tr((S_1 S_2)^1/2) is the sum of the square roots of the eigenvalues of S_1 S_2, computed here as
  those of the symmetric S_1^1/2 S_2 S_1^1/2 (same eigenvalues, real and >= 0 by construction) in float64.
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3, averaged over 100
  subsets of 1000 rows of each set drawn without replacement by numpy's RandomState(seed) (mean and std).
- Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)) on the unbiased logits in 10 splits of the
  rows shuffled by RandomState(seed).permutation (mean and std over splits).
- Precision and recall (Kynkaenniemi et al. 2019): a generated point is precise when it lies inside some real
  point's ball, whose radius is the distance to its k-th nearest real neighbour (k = 3, self excluded: the
  (k+1)-th smallest distance, membership by <=); recall swaps the roles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vqgen.cli import VqgenError

KID_SUBSETS, KID_SUBSET_SIZE, SEED, IS_SPLITS, PR_K = 100, 1000, 2020, 10, 3


@dataclass
class GaussianStats:
    """Mean (d,) and unbiased covariance (d, d) of a feature set, float64."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int

    @classmethod
    def of(cls, features: torch.Tensor) -> GaussianStats:
        if len(features) < 2:
            raise VqgenError(f"FID needs at least 2 images per set, got {len(features)}")
        f = features.double()
        mu = f.mean(0)
        centred = f - mu
        return cls(mu, centred.T @ centred / (len(f) - 1), len(f))  # (d, d)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    root = _sqrtm_psd(a.sigma)
    inner = root @ b.sigma @ root  # symmetric PSD; its eigenvalues are those of sigma_a @ sigma_b
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = a.mu - b.mu
    return float(diff @ diff + a.sigma.trace() + b.sigma.trace() - 2 * tr_covmean)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape

    def k(p, q):
        return (p @ q.T / d + 1) ** 3  # (m, m)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.sum() / (m * m))


def kernel_distance(
    fake: torch.Tensor, real: torch.Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed=SEED
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets of `subset_size` rows of each set.

    In float32 numpy, as torch-fidelity computes it: KID is a small difference of large kernel sums, so the
    arithmetic's precision shows at the 1e-4 level, and published KIDs carry float32's."""
    if min(len(fake), len(real)) < subset_size:
        raise VqgenError(
            f"KID draws subsets of {subset_size} images, but there are {len(fake)} samples and {len(real)} real "
            f"images; pass a smaller --kid_subset_size (at most {min(len(fake), len(real))}) or more images"
        )
    rng = np.random.RandomState(seed)
    x, y = fake.float().numpy(), real.float().numpy()
    values = []
    for _ in range(subsets):
        i = rng.choice(len(x), subset_size, replace=False)
        j = rng.choice(len(y), subset_size, replace=False)
        values.append(_mmd2_unbiased(x[i], y[j]))
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed=SEED) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(mean KL(p(y|x) || p(y))), rows shuffled by RandomState(seed)."""
    n = len(logits)
    if n < splits:
        raise VqgenError(f"the Inception Score splits the samples {splits} ways and needs at least {splits}, got {n}")
    logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))].double()
    log_p = logits.log_softmax(1)  # (N, classes)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = chunk.exp().mean(0).log()  # (classes,)
        kl = (chunk.exp() * (chunk - log_marginal)).sum(1)  # (n_i,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radius(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance of every point to its k-th nearest other point of the same set."""
    return torch.cat([torch.cdist(p, points).kthvalue(k + 1, dim=1).values for p in points.split(chunk)])


def _inside_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    hits = [(torch.cdist(p, centres) <= radii).any(1) for p in points.split(chunk)]
    return float(torch.cat(hits).float().mean())


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = PR_K, chunk: int = 4096) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real` features, k-NN balls of each set."""
    if min(len(fake), len(real)) <= k:
        raise VqgenError(
            f"precision/recall need more than k={k} images per set for the k-th neighbour, got {len(fake)} samples "
            f"and {len(real)} real images"
        )
    fake, real = fake.float(), real.float()
    precision = _inside_any(fake, real, _kth_radius(real, k, chunk), chunk)
    recall = _inside_any(real, fake, _kth_radius(fake, k, chunk), chunk)
    return precision, recall
