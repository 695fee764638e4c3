"""RGE throughput: q directions evaluated as one batched computation, side by side with a loop and the previous path.

Three ways to take one RGE step (``bbzo.step.estimate`` with ``rge``: q + 1 loss queries and the estimate), timed
in the same process, interleaved round by round (the order rotates), median over ``--rounds``:

* ``batched`` -- today's default: a staged model's directions run as whole parameter sets stacked through the
  stages (:mod:`bbzo.adapters.stacked`); a model in a rollout gets its stacked parameters in one matrix;
* ``previous`` -- the path before it: directions go to the generic ``torch.func`` adapter (``vmap`` over
  ``functional_call``, chunks sized by the activation bound) and each direction's parameter set is built in a
  Python loop (the previous ``DirectionProbes.stack``, restored for this measurement only);
* ``loop`` -- the naive baseline: a Python loop of q + 1 perturbed forwards of the model (BN with each set's batch
  statistics, running statistics frozen), then the same estimate.

Cases: DeepZero's 730-parameter CNN with q = d (batch 256), ResNet-20 (batch 64, q = ``--resnet-q``), and the ZO-SOL
rollout (``bbzo.tasks.sol.make_rollout`` through PhiFlow's Karman solver, :class:`~bbzo.adapters.LoopAdapter`, the
tiny corrector, q = ``--sol-q``; no loop there: the rollout itself batches). GFLOP/s count the model's convolution
and matrix FLOPs (``torch.utils.flop_counter``) of q + 1 forwards per step, against a 2048^3 sgemm timed in the
same rounds. The machine may be shared: ratios are per round (paired), then the median.

    .venv/bin/python benchmarks/rge_throughput.py --out benchmarks/results/rge_throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bbzo  # noqa: E402
import bbzo.step  # noqa: E402  (a submodule: the package imports it lazily)
from bbzo.adapters import LoopAdapter, StagedAdapter, frozen_bn_stats  # noqa: E402
from bbzo.models import create_model  # noqa: E402
from bbzo.probes import DirectionProbes, make_direction  # noqa: E402
from bbzo.provenance import provenance  # noqa: E402
from common import emit  # noqa: E402

SEED = 0


def _previous_stack(self: DirectionProbes, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``DirectionProbes.stack`` as it was before the batched path (one direction and one tensor at a time)."""
    k = len(self)
    out = {n: params[n].unsqueeze(0).repeat(k, *([1] * params[n].dim())) for n in self.names}
    for j in range(k):
        u = self.direction(int(self.dirs[j]))
        step = float(self.delta[j])
        for n, un in zip(self.names, u):
            out[n][j].add_(un.to(device=out[n].device, dtype=out[n].dtype), alpha=step)
    return out


@contextlib.contextmanager
def previous_stack() -> Iterator[None]:
    saved = DirectionProbes.stack
    DirectionProbes.stack = _previous_stack  # type: ignore[method-assign]
    try:
        yield
    finally:
        DirectionProbes.stack = saved  # type: ignore[method-assign]


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def loop_step(model: nn.Module, est: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The naive RGE step: q + 1 plain forwards in a Python loop (each set's own BN batch statistics), then the
    estimate; returns the gradient and the ``(q,)`` mean losses."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}  # a copy: the loop writes the live ones
    request, _ = est.ask(params, est.init(params))
    probes = request.probes
    work = {n: p.clone() for n, p in params.items()}
    live = dict(model.named_parameters())
    means = []
    with torch.no_grad(), frozen_bn_stats(model):
        base = float(ce(model(x), y).mean())
        try:
            for j in range(len(probes)):
                u = make_direction(probes.seed, int(probes.dirs[j]), probes.shapes, probes.distribution)
                for n, un in zip(probes.names, u):
                    live[n].copy_(params[n]).add_(un.to(params[n].dtype), alpha=float(probes.delta[j]))
                means.append(float(ce(model(x), y).mean()))
        finally:
            for n, p in live.items():
                p.copy_(work[n])
    losses = torch.tensor(means, dtype=torch.float64)
    coef = (losses - base) / est.mu / len(probes)
    grads = {}
    acc = [torch.zeros(s, dtype=torch.float64) for s in probes.shapes]
    for k in range(len(probes)):
        for a, u in zip(acc, make_direction(probes.seed, int(probes.dirs[k]), probes.shapes, probes.distribution)):
            a.add_(u, alpha=float(coef[k]))
    grads = dict(zip(probes.names, acc))
    return grads, losses


def forward_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def sgemm_gflops(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_case(name: str, paths: dict[str, Callable[[], Any]], rounds: int, flops_per_step: int | None,
             check: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every path once per round (the order rotating), ``rounds`` times; medians, paired ratios, GFLOP/s."""
    names = list(paths)
    times: dict[str, list[float]] = {n: [] for n in names}
    gemm: list[float] = []
    last: dict[str, Any] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            dt, last[n] = timed(paths[n])
            times[n].append(dt)
            print(f"[{name}] round {r + 1}/{rounds} {n}: {dt:.2f} s", file=sys.stderr, flush=True)
        gemm.append(sgemm_gflops())
    med = {n: statistics.median(v) for n, v in times.items()}
    out: dict[str, Any] = {"seconds_per_step": {n: [round(t, 3) for t in v] for n, v in times.items()},
                           "median_s": {n: round(v, 3) for n, v in med.items()},
                           "sgemm_gflops_per_round": [round(g, 1) for g in gemm]}
    ratios = {}
    for n in names:
        if n != "batched":
            per_round = [a / b for a, b in zip(times[n], times["batched"])]
            ratios[f"batched_vs_{n}"] = {"median": round(statistics.median(per_round), 2),
                                         "per_round": [round(v, 2) for v in per_round]}
    out["speedup"] = ratios
    if flops_per_step:
        out["gflop_per_step"] = round(flops_per_step / 1e9, 2)
        out["gflops"] = {n: round(flops_per_step / v / 1e9, 1) for n, v in med.items()}
        out["gflops_fraction_of_sgemm"] = {n: round(flops_per_step / v / 1e9 / statistics.median(gemm), 3)
                                           for n, v in med.items()}
    if check is not None:
        out["check"] = check(last)
    return out


def cnn_case(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(SEED)
    model = create_model("simple_cnn_730").train()
    g = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    d = sum(p.numel() for p in model.parameters())
    est = bbzo.create_estimator("rge", q=d, mu=5e-3, seed=SEED)
    batched, old = StagedAdapter(model), StagedAdapter(model, stacked_directions=False)

    def previous() -> Any:
        with previous_stack():
            return bbzo.step.estimate(old, est, ce, x, y)

    def check(last: dict[str, Any]) -> dict[str, Any]:
        ev = batched.bind(ce, x, y)
        params = batched.trainable()
        request, _ = est.ask(params, est.init(params))
        mean = ev.probe_losses(request.probes).mean(1)
        _, loop_losses = last["loop"]
        cos = lambda a, b: float(sum((a[n] * b[n]).sum() for n in a) / (  # noqa: E731
            sum((a[n] ** 2).sum() for n in a).sqrt() * sum((b[n] ** 2).sum() for n in b).sqrt()))
        g_loop = {n: v.float() for n, v in last["loop"][0].items()}
        return {"max_abs_loss_diff_batched_vs_loop": float((mean - loop_losses).abs().max()),
                "gradient_cosine_batched_vs_loop": round(cos(last["batched"].grads, g_loop), 6),
                "gradient_cosine_previous_vs_loop": round(cos(last["previous"].grads, g_loop), 6)}

    with frozen_bn_stats(model), torch.no_grad():
        flops = forward_flops(lambda: model(x)) * (d + 1)
    res = run_case("cnn730", {"batched": lambda: bbzo.step.estimate(batched, est, ce, x, y), "previous": previous,
                              "loop": lambda: loop_step(model, est, x, y)}, args.rounds, flops, check)
    return {"model": "simple_cnn_730", "params": d, "q": d, "batch": args.batch, **res}


def resnet_case(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(SEED)
    model = create_model("resnet20").train()
    g = torch.Generator().manual_seed(SEED)
    b = args.resnet_batch
    x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
    est = bbzo.create_estimator("rge", q=args.resnet_q, mu=5e-3, seed=SEED)
    batched, old = StagedAdapter(model), StagedAdapter(model, stacked_directions=False)

    def previous() -> Any:
        with previous_stack():
            return bbzo.step.estimate(old, est, ce, x, y)

    with frozen_bn_stats(model), torch.no_grad():
        flops = forward_flops(lambda: model(x)) * (args.resnet_q + 1)
    res = run_case("resnet20", {"batched": lambda: bbzo.step.estimate(batched, est, ce, x, y), "previous": previous,
                                "loop": lambda: loop_step(model, est, x, y)}, args.rounds, flops)
    return {"model": "resnet20", "params": sum(p.numel() for p in model.parameters()), "q": args.resnet_q, "batch": b,
            **res}


def sol_case(args: argparse.Namespace) -> dict[str, Any]:
    from bbzo.models.sol_corrector import CORRECTOR_CHANNELS, Corrector
    from bbzo.oracles.karman import KarmanOracle, KarmanSetup, KarmanSolver
    from bbzo.tasks.sol import make_rollout

    torch.manual_seed(SEED)
    setup = KarmanSetup()
    solver = KarmanSolver(setup, backend="numpy", jit=False)
    re = torch.tensor([390.6])
    state = solver.initial_state([390.6])
    n = args.sol_unroll
    frames = [state]
    for _ in range(n):
        frames.append(solver.step(frames[-1], re))
    targets = torch.stack(frames[1:], 1)  # (1, n, 2, ny, nx): the solver's own future as a stand-in reference
    model = Corrector(CORRECTOR_CHANNELS["tiny"], torch.ones(3), torch.ones(2), zero_last=False)
    oracle = KarmanOracle(setup, backend="torch")
    rollout = make_rollout(oracle.query, torch.ones(2))
    est = bbzo.create_estimator("rge", q=args.sol_q, mu=5e-3, seed=SEED)
    adapter = LoopAdapter(model, sets_per_call=args.sol_q)
    inputs = (state, re)
    bbzo.step.estimate(adapter, est, rollout, inputs, targets)  # traces the solver's jit for this batch size

    def previous() -> Any:
        with previous_stack():
            return bbzo.step.estimate(adapter, est, rollout, inputs, targets)

    res = run_case("sol", {"batched": lambda: bbzo.step.estimate(adapter, est, rollout, inputs, targets),
                           "previous": previous}, args.rounds, None)
    return {"model": "sol_corrector tiny", "params": sum(p.numel() for p in model.parameters()), "q": args.sol_q,
            "unroll": n, "sets_per_call": args.sol_q, "oracle": "KarmanOracle 32x64, torch backend", **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="cnn730,resnet20,sol")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256, help="the 730-parameter CNN's batch")
    ap.add_argument("--resnet-batch", type=int, default=64)
    ap.add_argument("--resnet-q", type=int, default=32)
    ap.add_argument("--sol-q", type=int, default=32)
    ap.add_argument("--sol-unroll", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"cnn730": cnn_case, "resnet20": resnet_case, "sol": sol_case}
    t0 = time.perf_counter()
    results = {c: cases[c](args) for c in args.cases.split(",")}
    out = {"benchmark": "rge_throughput", "cases": results, "rounds": args.rounds, "threads": args.threads,
           "seed": SEED, "goal": "batched >= 5x the loop on the 730-parameter CNN (q = d); no slower than the "
                                 "previous path on ResNet-20 and the ZO-SOL rollout",
           "wall_s": round(time.perf_counter() - t0, 1),
           "command": " ".join(["python", "benchmarks/rge_throughput.py", *sys.argv[1:]]), **provenance()}
    emit(out, args.out)


if __name__ == "__main__":
    main()
