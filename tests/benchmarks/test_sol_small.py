"""``benchmarks/sol_small.py``: paired per-seed gaps of every ZO method, and the (method, seed) cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sol_small  # noqa: E402

from bbzo.config import resolve  # noqa: E402
from bbzo.tasks.sol import SolSettings  # noqa: E402


def _seed(maes: dict[str, float]) -> dict:
    return {"eval": {m: {"mae": v, "mae_per_re": {"100": v}} for m, v in maes.items()},
            "train": {m: {"zeroth_order": m in ("zo", "hybrid")} for m in maes}}


def test_paired_gaps_of_every_zo_method_against_non_and_nog():
    per_seed = {0: _seed({"src": 0.03, "non": 0.0100, "nog": 0.0090, "zo": 0.0095, "hybrid": 0.0085}),
                1: _seed({"src": 0.03, "non": 0.0110, "nog": 0.0092, "zo": 0.0090, "hybrid": 0.0088}),
                2: _seed({"src": 0.03, "non": 0.0090, "nog": 0.0080, "zo": 0.0085, "hybrid": 0.0082})}
    out = sol_small.summarize(per_seed)
    assert out["zeroth_order_methods"] == ["zo", "hybrid"]
    g = out["paired_gaps"]["zo_vs_nog"]
    assert g["paired_gap_per_seed"] == {"0": -0.0005, "1": 0.0002, "2": -0.0005} and g["better_in_seeds"] == "1/3"
    assert g["paired_gap"]["mean"] == round((-0.0005 + 0.0002 - 0.0005) / 3, 5)
    assert out["paired_gaps"]["zo_vs_non"]["better_in_seeds"] == "3/3"
    assert out["paired_gaps"]["hybrid_vs_nog"]["paired_gap_per_seed"] == {"0": 0.0005, "1": 0.0004, "2": -0.0002}
    goals = out["goals"]
    assert goals["best_zo_method"] == "hybrid" and goals["best_zo_beats_non_and_nog_in_the_mean"] is True
    assert goals["best_zo_beats_non_and_nog_in_every_seed"] is False  # seed 2: NOG 0.0080 < hybrid 0.0082
    assert out["zo_vs_non"]["zo_better_in_seeds"] == "3/3"  # the earlier runs' format is kept
    assert "| ZO-SOL | NOG (no solver gradient) | -0.00050 | +0.00020 | -0.00050 |" in sol_small.gap_table(out)


def test_a_cached_job_is_reused_only_with_its_settings_and_the_non_it_fine_tuned(tmp_path):
    s, _ = resolve(SolSettings, {"preset": "small", "out": tmp_path, "seed": 0})
    assert s.init == "non"
    (tmp_path / "non").mkdir()
    (tmp_path / "nog").mkdir()
    (tmp_path / "non" / "corrector.pt").write_bytes(b"non v1")
    (tmp_path / "nog" / "corrector.pt").write_bytes(b"nog")
    entry = {"settings": sol_small.settings_key(s, "nog"), "init_from": sol_small._sha256(tmp_path / "non" / "corrector.pt"),
             "corrector": sol_small._sha256(tmp_path / "nog" / "corrector.pt"), "eval": {"mae": 0.01}}
    (tmp_path / "nog" / "bench.json").write_text(json.dumps(entry))
    assert sol_small.cached(s, tmp_path, "nog")["eval"]["mae"] == 0.01
    other, _ = resolve(SolSettings, {"preset": "small", "out": tmp_path, "seed": 0, "nog_lr": 1e-2})
    assert sol_small.cached(other, tmp_path, "nog") is None  # another setting of NOG: rerun
    zo_only, _ = resolve(SolSettings, {"preset": "small", "out": tmp_path, "seed": 0, "sparsity": 0.9})
    assert sol_small.cached(zo_only, tmp_path, "nog") is not None  # ZO-SOL's own setting: NOG's result stands
    shared, _ = resolve(SolSettings, {"preset": "small", "out": tmp_path, "seed": 0, "unroll": 8})
    assert sol_small.cached(shared, tmp_path, "nog") is None
    older = {**entry, "settings": {k: v for k, v in entry["settings"].items() if k != "init_jitter"}}
    (tmp_path / "nog" / "bench.json").write_text(json.dumps(older))  # run before init_jitter existed
    assert sol_small.cached(s, tmp_path, "nog") is not None  # a setting added since matches at its default
    jitter, _ = resolve(SolSettings, {"preset": "small", "out": tmp_path, "seed": 0, "init_jitter": 1e-7})
    assert sol_small.cached(jitter, tmp_path, "nog") is None
    (tmp_path / "nog" / "bench.json").write_text(json.dumps(entry))
    moved, _ = resolve(SolSettings, {"preset": "small", "out": tmp_path / "elsewhere", "seed": 0, "methods": ("nog",)})
    assert sol_small.cached(moved, tmp_path, "nog") is not None  # folders and method lists are not settings
    assert "nog_lr" in sol_small.settings_key(s, "nog") and "nog_lr" not in sol_small.settings_key(s, "non")
    (tmp_path / "non" / "corrector.pt").write_bytes(b"non v2")  # NON retrained: what NOG fine-tuned is gone
    assert sol_small.cached(s, tmp_path, "nog") is None
    assert sol_small.cached(s, tmp_path, "zo") is None  # never ran
