"""Cohen et al.'s randomized-smoothing CERTIFY and PREDICT (ICML 2019), batched over the noise samples.

The smoothed classifier is ``g(x) = argmax_c P(f(D(x + delta)) = c)``, ``delta ~ N(0, sigma^2 I)`` in pixel
units. CERTIFY guesses the top class from ``n0`` samples, counts it in ``n`` fresh samples, takes the
one-sided ``1 - alpha`` Clopper-Pearson lower bound ``pA`` of its probability (``scipy.stats.beta.ppf(alpha,
nA, n - nA + 1)``, exact), abstains when ``pA < 1/2`` and otherwise certifies the L2 radius
``sigma * Phi^-1(pA)``. PREDICT abstains unless a two-sided binomial test of the top-two counts has
``p <= alpha`` (``scipy.stats.binomtest``; ``binom_test`` is gone from SciPy).

The certified accuracy at radius ``r`` is the fraction of test images that are classified correctly *and*
certified with radius ``>= r`` (Salman et al.'s ``>=``; abstentions count as wrong); ``r = 0`` is the
smoothed classifier's accuracy.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from scipy.stats import beta, binomtest, norm

from bbzo.errors import ConfigError

__all__ = ["ABSTAIN", "RADII", "lower_confidence_bound", "max_radius", "sample_counts", "certify", "predict",
           "certify_dataset", "certified_accuracy", "accuracy_interval"]

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75)

Pipeline = Callable[[torch.Tensor], torch.Tensor]  # noisy images (N, C, H, W) -> logits (N, K)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion (0 when ``n_a == 0``)."""
    if not 0 <= n_a <= n or n < 1:
        raise ConfigError(f"need 0 <= n_a <= n and n >= 1, got n_a={n_a}, n={n}.")
    return 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``n`` samples can certify: ``sigma * Phi^-1(alpha^(1/n))`` (every sample correct)."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def _check(sigma: float, n: int, alpha: float, batch: int) -> None:
    if sigma <= 0 or n < 1 or not 0 < alpha < 1 or batch < 1:
        raise ConfigError(f"need sigma > 0, n >= 1, 0 < alpha < 1, batch >= 1; got sigma={sigma}, n={n}, "
                          f"alpha={alpha}, batch={batch}.")


@torch.no_grad()
def sample_counts(pipeline: Pipeline, x: torch.Tensor, num: int, sigma: float, batch: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Class counts ``(K,)`` of ``pipeline`` on ``num`` noisy copies of one image ``x (C, H, W)``."""
    counts: Optional[torch.Tensor] = None
    left = num
    while left > 0:
        b = min(batch, left)
        noise = torch.randn((b, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
        logits = pipeline(x.unsqueeze(0) + sigma * noise)
        k = int(logits.shape[1])
        c = torch.bincount(logits.argmax(1).cpu(), minlength=k)
        counts = c if counts is None else counts + c
        left -= b
    assert counts is not None
    return counts


def certify(pipeline: Pipeline, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch: int,
            generator: torch.Generator) -> tuple[int, float]:
    """CERTIFY one image: ``(class or ABSTAIN, radius)``."""
    _check(sigma, n, alpha, batch)
    guess = int(sample_counts(pipeline, x, n0, sigma, batch, generator).argmax())
    n_a = int(sample_counts(pipeline, x, n, sigma, batch, generator)[guess])
    p_a = lower_confidence_bound(n_a, n, alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0
    return guess, float(sigma * norm.ppf(p_a))


def predict(pipeline: Pipeline, x: torch.Tensor, sigma: float, n: int, alpha: float, batch: int,
            generator: torch.Generator) -> int:
    """PREDICT one image: the top class, or ABSTAIN unless the top-two binomial test has ``p <= alpha``."""
    _check(sigma, n, alpha, batch)
    counts = sample_counts(pipeline, x, n, sigma, batch, generator)
    top = torch.topk(counts, min(2, counts.numel()))
    n_a = int(top.values[0])
    n_b = int(top.values[1]) if top.values.numel() > 1 else 0
    if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top.indices[0])


def certify_dataset(pipeline: Pipeline, images: torch.Tensor, labels: torch.Tensor, *, sigma: float, n0: int,
                    n: int, alpha: float, batch: int, seed: int = 0, indices: Optional[Sequence[int]] = None,
                    progress: Optional[Callable[[Iterable], Iterable]] = None, device: Any = "cpu"
                    ) -> list[dict[str, Any]]:
    """CERTIFY every image: rows ``{idx, label, predict, radius, correct, seconds}``.

    The noise of image ``idx`` comes from its own generator (``seed``, ``idx``), so a row does not depend on
    which other images are certified.
    """
    rows = []
    idx = list(range(images.shape[0])) if indices is None else list(indices)
    it: Iterable = progress(idx) if progress is not None else idx
    for i in it:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
        t0 = time.perf_counter()
        cls, radius = certify(pipeline, images[i].to(device), sigma, n0, n, alpha, batch, g)
        rows.append({"idx": int(i), "label": int(labels[i]), "predict": cls, "radius": round(radius, 6),
                     "correct": int(cls == int(labels[i])), "seconds": round(time.perf_counter() - t0, 4)})
    return rows


def certified_accuracy(rows: Sequence[dict[str, Any]], radii: Sequence[float] = RADII) -> dict[str, float]:
    """``{radius: certified accuracy in %}``: correct and ``radius >= r`` (abstentions are wrong)."""
    if not rows:
        raise ConfigError("no certified images to tabulate.")
    out = {}
    for r in radii:
        hit = sum(1 for row in rows if row["correct"] and row["predict"] != ABSTAIN and row["radius"] >= r)
        out[f"{r:g}"] = round(100.0 * hit / len(rows), 2)
    return out


def accuracy_interval(percent: float, count: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval, in %, of an accuracy measured on ``count`` images."""
    k = int(round(percent * count / 100.0))
    a = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, count - k + 1))
    high = 1.0 if k == count else float(beta.ppf(1 - a, k + 1, count - k))
    return round(100 * low, 2), round(100 * high, 2)
