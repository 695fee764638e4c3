"""CGE throughput on CIFAR ResNet-20 (batch 64, 1% random coordinates): every evaluation path side by side.

Prints one JSON object (``--out`` also writes it). ``--quick`` times fewer coordinates (under a minute).

Keys (all per coordinate unless named otherwise; ms):
  forward_ms                one full batch-64 forward (no grad): the median of every forward timed in the run (at
                            the start, in a window of 8 before and after each timed bbzo estimate, at the end);
                            ``forward_ms_quartiles`` shows how much it moved
  forward_channels_last_ms  the same forward with the model and input in channels-last memory (what a user could
                            also do; bbzo's dense downstream runs channels-last on CPU, see bbzo/adapters/runners.py)
  deepzero_loop_ms_per_coord DeepZero's single-process ``cge``: deep-copy the parameters, perturb, reload the
                            state dict, full forward + loss, for every coordinate (the anchor)
  naive_ms_per_coord        perturb one coordinate in place, full forward + loss, restore
  batched_ms_per_coord      bbzo, generic torch.func adapter (K perturbed sets per call, no feature reuse)
  reuse_ms_per_coord        bbzo, stage-level feature reuse + linear-layer shortcut (channel reuse off)
  channel_ms_per_coord      bbzo's default: stage- and channel-level reuse
  autograd_step_ms          forward + backward
  limit_ms_per_coord        cost of only the stages downstream of each coordinate (stages timed at batch
                            64, averaged over the set): what perfect reuse at stage granularity costs
  conv_census               one more default estimate with every F.conv2d call counted and timed (a sync
                            around each): its FLOPs per coordinate, their fraction of one forward's conv
                            FLOPs (machine-independent), the share of the time in convolutions, and
                            ``conv_alone_over_forward``: the same convolutions, each shape timed on its own,
                            per coordinate over the forward -- what an exact evaluation costs here if
                            everything but these convolutions were free
Also ratios to forward_ms and the speed-ups over naive, all measured in the same run, and
``channel_over_paired_forward`` / ``reuse_over_paired_forward``: the median over the timed estimates of each one's
cost per coordinate over the median forward of the windows right before and after it (the ratio least moved by
this shared box's slow and fast spells; ``paired_ratios`` lists them).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import bbzo

from bbzo.adapters import FunctionalAdapter, StagedAdapter, frozen_bn_stats
from bbzo.adapters.linear_delta import linear_core
from bbzo.models import create_model
from bbzo.provenance import provenance
from bbzo.step import estimate

from common import coords_from_flat, emit  # benchmarks/ is on sys.path when run as a script
from convs import ConvCensus


def samples(fn, reps: int, warmup: int = 1) -> list[float]:
    """Wall times of ``fn()`` in seconds over ``reps`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    return statistics.median(samples(fn, reps, warmup))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer coordinates/reps (< 1 min on 2 cores)")
    ap.add_argument("--density", type=float, default=0.01, help="fraction of coordinates (default 1%%)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", bbzo.InefficientSettingsWarning)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    torch.manual_seed(args.seed)
    model = create_model("resnet20").to(dev).train()
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    loss_fn = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731

    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(args.seed)
    total = sum(p.numel() for p in params.values())
    m = int(round(args.density * total))
    flat = torch.randperm(total, generator=g)[:m].sort().values  # uniformly random over all coordinates
    coords = coords_from_flat(params, flat)
    reps = 3 if args.quick else 7

    def sync_call(fn):
        def run():
            fn()
            sync()
        return run

    def forward_samples(n: int = 3 * reps, warmup: int = 3) -> list[float]:
        with torch.no_grad(), frozen_bn_stats(model):
            return samples(sync_call(lambda: model(x)), n, warmup=warmup)

    fwd_samples = forward_samples()  # more around every bbzo estimate and at the end: the median of all is reported
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), frozen_bn_stats(model_cl):
        forward_cl_s = timed(sync_call(lambda: model_cl(x_cl)), 3 * reps, warmup=3)

    def autograd_step():
        model.zero_grad(set_to_none=True)
        with frozen_bn_stats(model):
            loss_fn(model(x), y).mean().backward()
    autograd_s = timed(sync_call(autograd_step), 2 * reps, warmup=2)

    # naive: one coordinate at a time, full forward (DeepZero's loop without its deepcopy/state_dict)
    n_naive = 10 if args.quick else 40
    sample = torch.randperm(m, generator=g)[:n_naive]
    names = list(params)
    owner = []
    for n in names:
        for _ in range(int(coords.get(n, torch.zeros(0)).numel())):
            owner.append(n)
    flat_idx = torch.cat([coords[n] for n in names if n in coords])

    def naive():
        with torch.no_grad(), frozen_bn_stats(model):
            base = loss_fn(model(x), y).mean()
            for s in sample.tolist():
                p = params[owner[s]].view(-1)
                i = int(flat_idx[s])
                old = p[i].item()
                p[i] += 5e-3
                _ = (loss_fn(model(x), y).mean() - base) / 5e-3
                p[i] = old
        sync()
    naive_s = timed(naive, 1 if args.quick else 2) / n_naive

    n_dz = max(4, n_naive // 4)

    def deepzero_loop():
        """``gradient_estimate.cge`` of the reference: a deep copy and a state-dict reload per coordinate."""
        base_sd = copy.deepcopy(model.state_dict())
        with torch.no_grad(), frozen_bn_stats(model):
            base = loss_fn(model(x), y).mean()
            for s in sample[:n_dz].tolist():
                sd = copy.deepcopy(base_sd)
                sd[owner[s]].view(-1)[int(flat_idx[s])] += 5e-3
                model.load_state_dict(sd)
                _ = (loss_fn(model(x), y).mean() - base) / 5e-3
            model.load_state_dict(base_sd)
        sync()
    deepzero_s = timed(deepzero_loop, 1 if args.quick else 2) / n_dz

    paired: dict[str, list[float]] = {}

    def bbzo_run(adapter_cls, sub, key, **kw):
        """Median seconds per coordinate; each timed estimate sits between two windows of forwards, and
        ``paired[key]`` gets its ratio to the median forward of those windows (side by side in time)."""
        est = bbzo.create_estimator("sparse_cge", coords=sub)
        adapter = adapter_cls(model, **kw)
        r = estimate(adapter, est, loss_fn, x, y)  # warm-up
        per = []
        for _ in range(1 if args.quick else 3):
            before = forward_samples(8, warmup=1)
            t = time.perf_counter()
            r = estimate(adapter, est, loss_fn, x, y)
            sync()
            per.append((time.perf_counter() - t) / r.queries)
            around = before + forward_samples(8, warmup=1)
            fwd_samples.extend(around)
            paired.setdefault(key, []).append(per[-1] / statistics.median(around))
        return statistics.median(per), r

    # the generic adapter is slower: time it on a 20% subset of the set (same layer mix)
    sub_sel = torch.randperm(m, generator=g)[: max(20, m // (10 if args.quick else 5))]
    keep = torch.zeros(m, dtype=torch.bool)
    keep[sub_sel] = True
    sub_coords, pos = {}, 0
    for n in names:
        if n in coords:
            k = coords[n].numel()
            sel = coords[n][keep[pos:pos + k]]
            if sel.numel():
                sub_coords[n] = sel
            pos += k
    batched_s, _ = bbzo_run(FunctionalAdapter, sub_coords, "batched")
    reuse_s, reuse_res = bbzo_run(StagedAdapter, coords, "reuse", channel_reuse=False)
    channel_s, channel_res = bbzo_run(StagedAdapter, coords, "channel")

    # downstream-only limit from timed stages
    adapter = StagedAdapter(model)
    stages = adapter.stages
    with torch.no_grad(), frozen_bn_stats(model):
        acts = [x]
        for st in stages:
            acts.append(st(acts[-1]))
        stage_s = [timed(sync_call(lambda st=st, a=a: st(a)), 3 * reps, warmup=2) for st, a in zip(stages, acts[:-1])]
    suffix = [0.0] * (len(stages) + 1)
    for i in range(len(stages) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + stage_s[i]
    lim = []
    for n in names:
        if n not in coords:
            continue
        i = adapter.stage_of[n][0]
        own = 0.0 if linear_core(stages[i])[0] is not None else stage_s[i]
        lim += [own + suffix[i + 1]] * int(coords[n].numel())
    limit_s = sum(lim) / len(lim)

    # where the default path's time goes: every convolution of one more estimate, counted and timed
    census_adapter = StagedAdapter(model)
    estimate(census_adapter, bbzo.create_estimator("sparse_cge", coords=coords), loss_fn, x, y)  # warm-up
    with ConvCensus(sync) as census:
        t = time.perf_counter()
        census_res = estimate(census_adapter, bbzo.create_estimator("sparse_cge", coords=coords), loss_fn, x, y)
        sync()
        census_s = time.perf_counter() - t
    with ConvCensus(sync) as fwd_census, torch.no_grad(), frozen_bn_stats(model):
        model(x)
    conv_alone_s = census.standalone_seconds(dev)
    census_q = census_res.queries

    fwd_samples += forward_samples()
    forward_s = statistics.median(fwd_samples)
    ms = lambda s: round(1e3 * s, 4)  # noqa: E731
    out = {
        "benchmark": "cge_throughput",
        "model": "resnet20",
        "params": total,
        "batch": args.batch,
        "coords": m,
        "density": args.density,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "quick": args.quick,
        "forward_ms": ms(forward_s),
        "forward_ms_min": ms(min(fwd_samples)),
        "forward_channels_last_ms": ms(forward_cl_s),
        "deepzero_loop_ms_per_coord": ms(deepzero_s),
        "naive_ms_per_coord": ms(naive_s),
        "batched_ms_per_coord": ms(batched_s),
        "reuse_ms_per_coord": ms(reuse_s),
        "channel_ms_per_coord": ms(channel_s),
        "autograd_step_ms": ms(autograd_s),
        "limit_ms_per_coord": ms(limit_s),
        "sum_of_stages_ms": ms(sum(stage_s)),
        "naive_over_forward": round(naive_s / forward_s, 3),
        "batched_over_forward": round(batched_s / forward_s, 3),
        "deepzero_loop_over_forward": round(deepzero_s / forward_s, 3),
        "reuse_over_forward": round(reuse_s / forward_s, 3),
        "channel_over_forward": round(channel_s / forward_s, 3),
        "channel_over_forward_channels_last": round(channel_s / forward_cl_s, 3),
        "limit_over_forward": round(limit_s / forward_s, 3),
        "channel_over_paired_forward": round(statistics.median(paired["channel"]), 3),
        "reuse_over_paired_forward": round(statistics.median(paired["reuse"]), 3),
        "paired_ratios": {k: [round(v, 4) for v in vs] for k, vs in paired.items()},
        "forward_ms_quartiles": [ms(q) for q in statistics.quantiles(fwd_samples, n=4)],
        "conv_census": {
            "estimate_ms_per_coord": ms(census_s / census_q),
            "conv_ms_per_coord": ms(census.seconds / census_q),
            "conv_share": round(census.seconds / census_s, 3),
            "conv_gflop_per_coord": round(census.flops / census_q / 1e9, 4),
            "forward_conv_gflop": round(fwd_census.flops / 1e9, 4),
            "conv_flop_fraction_of_forward": round(census.flops / census_q / fwd_census.flops, 4),
            "conv_gflops_in_run": round(census.flops / census.seconds / 1e9, 1),
            "conv_gflops_alone": round(census.flops / conv_alone_s / 1e9, 1),
            "conv_alone_ms_per_coord": ms(conv_alone_s / census_q),
            "conv_alone_over_forward": round(conv_alone_s / census_q / forward_s, 3),
            "forward_gflops": round(fwd_census.flops / forward_s / 1e9, 1),
            "conv_calls": int(sum(r[0] for r in census.calls.values())),
        },
        "reuse_speedup_vs_naive": round(naive_s / reuse_s, 2),
        "channel_speedup_vs_naive": round(naive_s / channel_s, 2),
        "channel_speedup_vs_deepzero_loop": round(deepzero_s / channel_s, 2),
        "batched_speedup_vs_naive": round(naive_s / batched_s, 2),
        "reuse_batched_calls": reuse_res.calls,
        "full_sparse_cge_step_s": round(channel_s * channel_res.queries, 2),
        "full_sparse_cge_step_stage_reuse_s": round(reuse_s * reuse_res.queries, 2),
        "seed": args.seed,
        "command": " ".join(["python", *sys.argv]),
        "provenance": provenance(),
    }
    emit(out, args.out)


if __name__ == "__main__":
    main()
