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

scipy is imported by the functions that compute a bound, so the command line starts without it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from bbzo.errors import ConfigError

__all__ = ["ABSTAIN", "RADII", "NOISE_BLOCK", "lower_confidence_bound", "max_radius", "sample_counts", "certify", "predict",
           "certify_details", "predict_details", "certify_images", "certify_dataset", "certified_accuracy",
           "accuracy_interval", "image_generator", "NoiseStream", "predicted_accuracy"]

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75)

Pipeline = Callable[[torch.Tensor], torch.Tensor]  # noisy images (N, C, H, W) -> logits (N, K)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion (0 when ``n_a == 0``)."""
    from scipy.stats import beta

    if not 0 <= n_a <= n or n < 1:
        raise ConfigError(f"need 0 <= n_a <= n and n >= 1, got n_a={n_a}, n={n}.")
    return 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``n`` samples can certify: ``sigma * Phi^-1(alpha^(1/n))`` (every sample correct)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def _check(sigma: float, n: int, alpha: float, batch: int) -> None:
    if sigma <= 0 or n < 1 or not 0 < alpha < 1 or batch < 1:
        raise ConfigError(f"need sigma > 0, n >= 1, 0 < alpha < 1, batch >= 1; got sigma={sigma}, n={n}, "
                          f"alpha={alpha}, batch={batch}.")


#: noise samples drawn per generator call: a constant, so an image's samples do not depend on --batch
NOISE_BLOCK = 100


def image_generator(seed: int, key: int, device: Any = "cpu") -> torch.Generator:
    """The generator of one image's noise, ``(seed, key)``, on ``device`` (CUDA draws on the GPU)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed) * 1_000_003 + int(key))


class NoiseStream:
    """The noise samples of one image, ``take(b) -> (b, C, H, W)``, in order, whatever the ``b``.

    Samples are drawn from one generator in blocks of :data:`NOISE_BLOCK` (on the generator's device) and
    handed out in any batch sizes, so the samples -- and the counts and certificates -- do not depend on the
    pipeline's batch. On the CPU, with ``C*H*W`` a multiple of 16, a block of 100 draws the same numbers as
    one call per batch did before, so earlier results reproduce exactly.
    """

    def __init__(self, shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32,
                 block: int = NOISE_BLOCK) -> None:
        self.shape, self.generator, self.dtype, self.block = tuple(shape), generator, dtype, int(block)
        self._left: Optional[torch.Tensor] = None

    def take(self, b: int) -> torch.Tensor:
        parts, need = [], b
        while need > 0:
            if self._left is None or self._left.shape[0] == 0:
                self._left = torch.randn((self.block, *self.shape), generator=self.generator, dtype=self.dtype,
                                         device=self.generator.device)
            part, self._left = self._left[:need], self._left[need:]
            parts.append(part)
            need -= part.shape[0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stream(x: torch.Tensor, noise: Any) -> NoiseStream:
    return noise if isinstance(noise, NoiseStream) else NoiseStream(x.shape, noise, dtype=x.dtype)


@torch.no_grad()
def sample_counts(pipeline: Pipeline, x: torch.Tensor, num: int, sigma: float, batch: int,
                  generator: Any) -> torch.Tensor:
    """Class counts ``(K,)`` of ``pipeline`` on ``num`` noisy copies of one image ``x (C, H, W)``.

    ``generator``: a ``torch.Generator`` or the image's :class:`NoiseStream` (the noise is moved to ``x``'s device).
    """
    stream = _stream(x, generator)
    counts: Optional[torch.Tensor] = None
    left = num
    while left > 0:
        b = min(batch, left)
        noise = stream.take(b).to(x.device, non_blocking=True)
        logits = pipeline(x.unsqueeze(0) + sigma * noise)
        k = int(logits.shape[1])
        c = torch.bincount(logits.argmax(1), minlength=k).cpu()
        counts = c if counts is None else counts + c
        left -= b
    assert counts is not None
    return counts


def certify_details(pipeline: Pipeline, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch: int,
                    generator: Any) -> dict[str, Any]:
    """CERTIFY one image: ``{predict (class or ABSTAIN), radius, nA, pA_lower}``."""
    from scipy.stats import norm

    _check(sigma, n, alpha, batch)
    stream = _stream(x, generator)
    guess = int(sample_counts(pipeline, x, n0, sigma, batch, stream).argmax())
    n_a = int(sample_counts(pipeline, x, n, sigma, batch, stream)[guess])
    p_a = lower_confidence_bound(n_a, n, alpha)
    if p_a < 0.5:
        return {"predict": ABSTAIN, "radius": 0.0, "nA": n_a, "pA_lower": p_a}
    return {"predict": guess, "radius": float(sigma * norm.ppf(p_a)), "nA": n_a, "pA_lower": p_a}


def certify(pipeline: Pipeline, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch: int,
            generator: Any) -> tuple[int, float]:
    """CERTIFY one image: ``(class or ABSTAIN, radius)``."""
    d = certify_details(pipeline, x, sigma, n0, n, alpha, batch, generator)
    return d["predict"], d["radius"]


def predict_details(pipeline: Pipeline, x: torch.Tensor, sigma: float, n: int, alpha: float, batch: int,
                    generator: Any) -> dict[str, Any]:
    """PREDICT one image: ``{predict (class or ABSTAIN), nA, nB, p_value}`` (the top-two counts, binomial test)."""
    from scipy.stats import binomtest

    _check(sigma, n, alpha, batch)
    counts = sample_counts(pipeline, x, n, sigma, batch, generator)
    top = torch.topk(counts, min(2, counts.numel()))
    n_a = int(top.values[0])
    n_b = int(top.values[1]) if top.values.numel() > 1 else 0
    p_value = float(binomtest(n_a, n_a + n_b, 0.5).pvalue)
    return {"predict": ABSTAIN if p_value > alpha else int(top.indices[0]), "nA": n_a, "nB": n_b, "p_value": p_value}


def predict(pipeline: Pipeline, x: torch.Tensor, sigma: float, n: int, alpha: float, batch: int,
            generator: Any) -> int:
    """PREDICT one image: the top class, or ABSTAIN unless the top-two binomial test has ``p <= alpha``."""
    return predict_details(pipeline, x, sigma, n, alpha, batch, generator)["predict"]


def certify_images(pipeline: Pipeline, images: Iterable[tuple[int, int, torch.Tensor, int]], *, sigma: float,
                   n0: int, n: int, alpha: float, batch: int, seed: int = 0, device: Any = "cpu",
                   noise_device: Any = None, mode: str = "certify",
                   on_row: Optional[Callable[[dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """CERTIFY (or PREDICT, ``mode="predict"``) a stream of images; one row per image.

    Args:
        images: ``(key, idx, image (C, H, W), label)``: the image's noise comes from its own generator
            ``(seed, key)`` on ``noise_device`` (default ``device``), so a row depends on nothing else --
            not on the other images, their order, the batch, or an interruption in between; ``idx`` is
            the image's index in its dataset (reported).
        on_row: Called with each row as soon as it is done (the run appends it to ``certify.tsv``).
    Returns:
        Rows ``{idx, label, predict, radius, correct, nA, pA_lower, seconds}`` (PREDICT: ``{idx, label,
        predict, correct, nA, nB, p_value, seconds}``).
    """
    if mode not in ("certify", "predict"):
        raise ConfigError(f"mode must be certify or predict, got {mode!r}.")
    rows = []
    for key, idx, image, label in images:
        x = image.to(device, non_blocking=True)
        stream = NoiseStream(x.shape, image_generator(seed, key, noise_device or device), dtype=x.dtype)
        t0 = time.perf_counter()
        if mode == "certify":
            d = certify_details(pipeline, x, sigma, n0, n, alpha, batch, stream)
            d["radius"] = round(d["radius"], 6)
        else:
            d = predict_details(pipeline, x, sigma, n, alpha, batch, stream)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        cls = d.pop("predict")
        row = {"idx": int(idx), "label": int(label), "predict": cls, **({"radius": d.pop("radius")} if "radius" in d else {}),
               "correct": int(cls == int(label)), **d, "seconds": round(time.perf_counter() - t0, 4)}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def certify_dataset(pipeline: Pipeline, images: torch.Tensor, labels: torch.Tensor, *, sigma: float, n0: int,
                    n: int, alpha: float, batch: int, seed: int = 0, indices: Optional[Sequence[int]] = None,
                    progress: Optional[Callable[[Iterable], Iterable]] = None, device: Any = "cpu"
                    ) -> list[dict[str, Any]]:
    """CERTIFY images of an in-memory tensor: rows ``{idx, label, predict, radius, correct, nA, pA_lower, seconds}``.

    The noise of image ``idx`` comes from its own generator (``seed``, ``idx``), so a row does not depend on
    which other images are certified.
    """
    idx = list(range(images.shape[0])) if indices is None else list(indices)
    it: Iterable = progress(idx) if progress is not None else idx
    stream = ((i, i, images[i], int(labels[i])) for i in it)
    return certify_images(pipeline, stream, sigma=sigma, n0=n0, n=n, alpha=alpha, batch=batch, seed=seed,
                          device=device, noise_device="cpu")


def certified_accuracy(rows: Sequence[dict[str, Any]], radii: Sequence[float] = RADII) -> dict[str, float]:
    """``{radius: certified accuracy in %}``: correct and ``radius >= r`` (abstentions are wrong)."""
    if not rows:
        raise ConfigError("no certified images to tabulate.")
    out = {}
    for r in radii:
        hit = sum(1 for row in rows if row["correct"] and row["predict"] != ABSTAIN and row["radius"] >= r)
        out[f"{r:g}"] = round(100.0 * hit / len(rows), 2)
    return out


def predicted_accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """PREDICT's table: ``{"accuracy": %, "abstain": %}`` (abstentions are wrong)."""
    if not rows:
        raise ConfigError("no predicted images to tabulate.")
    return {"accuracy": round(100.0 * sum(r["correct"] for r in rows) / len(rows), 2),
            "abstain": round(100.0 * sum(1 for r in rows if r["predict"] == ABSTAIN) / len(rows), 2)}


def accuracy_interval(percent: float, count: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval, in %, of an accuracy measured on ``count`` images."""
    from scipy.stats import beta

    k = int(round(percent * count / 100.0))
    a = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, count - k + 1))
    high = 1.0 if k == count else float(beta.ppf(1 - a, k + 1, count - k))
    return round(100 * low, 2), round(100 * high, 2)
