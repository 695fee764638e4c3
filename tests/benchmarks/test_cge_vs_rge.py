"""benchmarks/cge_vs_rge.py: finished runs are reused, an interrupted one resumes bitwise, the screen picks per method."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cge_vs_rge  # noqa: E402
from bbzo.tasks.cifar import CifarBatches  # noqa: E402
from tests.helpers import tiny_cifar_npz  # noqa: E402


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return tiny_cifar_npz(tmp_path_factory.mktemp("c10") / "tiny.npz")


def bench(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["cge_vs_rge.py", *map(str, argv)])
    cge_vs_rge.main()
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_runs_are_cached_resumed_bitwise_and_assembled(npz, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    common = ["--data", npz, "--runs", "simple_cnn_730:0,1:2", "--methods", "fo", "--lr", "fo=0.1,cge=0.1,rge=0.1",
              "--batch", "20", "--checkpoint-every", "5"]
    # nothing trained yet: --assemble says what is missing
    res, _ = bench(monkeypatch, capsys, *common, "--work", tmp_path / "w", "--assemble", "--out", tmp_path / "a.json")
    assert res["complete"] is False and len(res["missing"]) == 2
    # seed 1's run is stopped during step 13 (10 steps per epoch): the benchmark stops, the run saves step 12
    real = CifarBatches.get_batch
    state = {"armed": True}

    def stop_once(self, step):
        if self.seed == 1 and step == 12 and state["armed"]:
            state["armed"] = False
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(CifarBatches, "get_batch", stop_once)
    with pytest.raises(SystemExit) as stopped:
        bench(monkeypatch, capsys, *common, "--work", tmp_path / "w")
    assert stopped.value.code == 130
    said = capsys.readouterr().err
    assert "interrupted: SIGINT stopped the run during step 13. The checkpoint" in said and "holds step 12" in said
    assert "Rerun the same command to continue" in said and "--resume" not in said
    folder = tmp_path / "w" / "main" / "simple_cnn_730" / "fo-lr0.1-ep2-seed1"
    assert (folder / "fo" / "checkpoint.pt").exists() and not cge_vs_rge.Runs.done(folder)
    seed0 = tmp_path / "w" / "main" / "simple_cnn_730" / "fo-lr0.1-ep2-seed0" / "results.json"
    stamp = seed0.stat().st_mtime_ns
    # the same command again: seed 0 is reused, seed 1 resumes from its checkpoint
    res, err = bench(monkeypatch, capsys, *common, "--work", tmp_path / "w", "--out", tmp_path / "out" / "c.json")
    assert "[resume] simple_cnn_730 fo lr 0.1 seed 1" in err and "seed 0" not in err
    assert seed0.stat().st_mtime_ns == stamp
    assert res["complete"] is True and res["missing"] == []
    runs = res["models"]["simple_cnn_730"]["runs"]["fo"]
    assert [c["epoch"] for c in runs["1"]["curve"]] == [1.0, 2.0]
    assert (tmp_path / "out" / "c.png").stat().st_size > 10_000
    # a straight run of seed 1 in a fresh cache ends bitwise where the interrupted one did
    straight, _ = bench(monkeypatch, capsys, "--data", npz, "--runs", "simple_cnn_730:1:2", "--methods", "fo", "--lr",
                        "fo=0.1,cge=0.1,rge=0.1", "--batch", "20", "--work", tmp_path / "fresh")
    a = torch.load(folder / "fo" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "fresh" / "main" / "simple_cnn_730" / "fo-lr0.1-ep2-seed1" / "fo" / "model.pt",
                   weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert straight["models"]["simple_cnn_730"]["runs"]["fo"]["1"]["acc"] == runs["1"]["acc"]
    summary = res["models"]["simple_cnn_730"]["summary"]["fo"]
    assert summary["n"] == 2 and summary["mean"] == round((runs["0"]["acc"] + runs["1"]["acc"]) / 2, 2)


def test_the_screen_scores_on_held_out_training_images_and_picks_per_method(npz, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    res, _ = bench(monkeypatch, capsys, "--data", npz, "--runs", "simple_cnn_730:0:1", "--methods", "fo",
                   "--screen-lrs", "0.01,0.3", "--screen-epochs", "1", "--val-images", "50", "--batch", "20",
                   "--work", tmp_path / "w")
    rows = res["screen"]["results"]["fo"]
    assert [r["lr"] for r in rows] == [0.01, 0.3]
    best = max(rows, key=lambda r: (r["val_acc"], -r["val_loss"]))["lr"]
    assert res["screen"]["chosen"] == {"fo": best}
    assert res["models"]["simple_cnn_730"]["lr"]["fo"] == best
    # the screen trained on 150 images (7 steps of 20) and evaluated on the 50 held out, never on the test images
    screen_run = json.loads((Path(rows[0]["folder"]) / "results.json").read_text())
    assert screen_run["data"]["train"] == 150 and screen_run["data"]["test"] == 50
    assert screen_run["data"]["evaluated_on"] == "validation"
    main_run = json.loads((Path(res["models"]["simple_cnn_730"]["runs"]["fo"]["0"]["folder"]) / "results.json").read_text())
    assert main_run["data"]["train"] == 200 and main_run["data"]["evaluated_on"] == "test"


def test_missing_data_is_one_clear_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="CIFAR-10 data not found at .*nope.npz. Pass --data PATH"):
        bench(monkeypatch, capsys, "--data", tmp_path / "nope.npz", "--work", tmp_path / "w")


def test_the_shares_of_several_processes_cover_every_run_once():
    import argparse

    keys = [("screen", m, lr) for m in ("fo", "cge", "rge") for lr in (0.1, 0.5)] + [("main", "m", "fo", s) for s in range(3)]
    owners = []
    for i in (1, 2, 3):
        args = argparse.Namespace(jobs_of=f"{i}/3")
        owners.append({k for k in keys if cge_vs_rge._mine(args, k)})
    assert set().union(*owners) == set(keys) and sum(map(len, owners)) == len(keys)
    with pytest.raises(SystemExit, match="I counts from 1 to N"):
        cge_vs_rge._mine(argparse.Namespace(jobs_of="0/2"), keys[0])


def test_the_goals_are_computed_from_paired_seeds():
    def per(fo, cge, rge):
        return {m: {s: {"acc": a} for s, a in enumerate(accs)} for m, accs in (("fo", fo), ("cge", cge), ("rge", rge))}

    # CGE ahead of RGE by 2 in every seed, spread 0.5: every goal met
    out = cge_vs_rge.summarize(per([33.0, 33.5, 33.2], [32.5, 33.0, 32.8], [30.5, 31.0, 30.8]), [0, 1, 2])
    assert out["cge_minus_rge"]["by_seed"] == [2.0, 2.0, 2.0] and out["seed_spread"] == 0.5
    assert out["goal"] == {"cge_within_1.5_of_fo": True, "cge_above_rge_beyond_seed_spread": True,
                           "cge_above_rge_every_seed": True, "paper_order_fo_cge_rge": True}
    # a seed where CGE falls back: ahead in the mean but not beyond the spread, nor in every seed
    out = cge_vs_rge.summarize(per([33.0, 33.5, 33.2], [32.5, 30.0, 32.8], [30.5, 31.0, 30.8]), [0, 1, 2])
    assert out["seed_spread"] == 2.8 and out["goal"]["cge_above_rge_beyond_seed_spread"] is False
    assert out["goal"]["cge_above_rge_every_seed"] is False and out["goal"]["paper_order_fo_cge_rge"] is True
    # one seed (the larger model): no spread to beat, the order is still checked
    out = cge_vs_rge.summarize(per([33.0], [32.0], [32.5]), [0])
    assert out["seed_spread"] is None and out["goal"]["cge_above_rge_beyond_seed_spread"] is None
    assert out["goal"]["paper_order_fo_cge_rge"] is False
    assert out["goal"]["cge_within_1.5_of_fo"] is True
