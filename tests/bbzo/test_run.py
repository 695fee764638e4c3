"""The shared run lifecycle, tried on a task written the way docs/adding_a_task.md says: a settings dataclass
plus build / evaluate functions get the CLI, --config, resume, logs, results and the folder policy for free."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bbzo.cli.main import main
from bbzo.cli.tasks import task_command
from bbzo.config import resolve
from bbzo.errors import ConfigError, OracleError
from bbzo.run import run_task
from bbzo.task import get_task
from bbzo.references import load_object

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "new_task" / "fit_task.py"
TASK = load_object(f"{EXAMPLE}:TASK")  # the example of docs/adding_a_task.md registers itself
FitSettings = TASK.settings


ROOT = Path(__file__).resolve().parents[2]


def fit(out, **kw):
    s, sources = resolve(FitSettings, {"out": out, "no_progress": True, **kw})
    return run_task(TASK, s, sources)


def test_a_task_gets_results_logs_plots_and_a_recorded_config(tmp_path):
    res = fit(tmp_path / "a")
    assert res["loss_after"] < 0.5 * res["loss_before"] and res["queries"] == 12 * 5  # CGE on 4 parameters
    for f in ("results.json", "results.md", "loss.png", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt",
              "model.pt", "train.json", "run.json", "config.resolved.yaml"):
        assert (tmp_path / "a" / f).exists(), f
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["task"] == "fit-line" and rec["settings"]["lr"] == 0.3 and rec["sources"]["out"] == "command line"
    if (ROOT / ".git").exists():  # a checkout: the run records the commit it ran at
        assert re.fullmatch(r"[0-9a-f]{40}", rec["provenance"]["commit"] or ""), rec["provenance"]
    assert "torch" in rec["provenance"]["versions"]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["status"] == "done"
    assert get_task("fit-line") is TASK


def test_other_settings_are_refused_by_name_and_runtime_ones_are_applied_and_recorded(tmp_path):
    out = tmp_path / "r"
    fit(out)
    with pytest.raises(ConfigError, match=r"already holds a run .*--resume.*--overwrite"):
        fit(out)
    with pytest.raises(ConfigError, match=r"differs in: lr \(0.3 -> 0.5\)\)\. .*may change on --resume: .*steps"):
        fit(out, resume=True, lr=0.5)  # never silently ignored
    res = fit(out, resume=True, steps=20)  # extend: applied, recorded, the cosine re-planned over 20 steps
    assert res["steps"] == 20
    rec = json.loads((out / "run.json").read_text())
    assert rec["history"][-1]["changed"]["steps"] == {"from": 12, "to": 20} and rec["settings"]["steps"] == 20
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr13 = rows[12]["lr"]
    assert lr13 == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 11 / 19)))  # no step at lr 0, no jump
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert fit(out, overwrite=True, lr=0.5)["steps"] == 12  # --overwrite starts over with other settings


def test_resume_needs_a_checkpoint_and_a_spent_budget_says_how_to_continue(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint .*Start the run without --resume"):
        fit(tmp_path / "empty", resume=True)
    out = tmp_path / "b"
    res = fit(out, max_queries=22)  # 5 queries per step
    assert res["steps"] == 4 and json.loads((out / "train.json").read_text())["stopped_by"] == "max_queries"
    with pytest.raises(ConfigError, match="query budget of this run is spent: 20 of --max-queries 22 .*Raise --max-queries"):
        fit(out, resume=True, max_queries=22)
    res = fit(out, resume=True, max_queries=1000)
    assert res["steps"] == 12 and res["queries"] == 60


def test_a_failed_run_writes_its_status_and_resume_completes_it_exactly(tmp_path, monkeypatch):
    ref = fit(tmp_path / "ref")
    out = tmp_path / "crash"
    module = sys.modules[TASK.build.__module__]
    calls = []

    def crashing(rows):  # initial evaluation, 7 steps of 2 calls, then step 8 fails
        calls.append(1)
        if len(calls) == 1 + 7 * 2 + 1:
            raise RuntimeError("the simulator segfaulted (pretend)")
        return 2.0 * rows

    monkeypatch.setattr(module, "simulate", crashing)
    with pytest.raises(OracleError, match=r"call #\d+ \(step 8, .*segfaulted.*checkpoint \S+ holds step 7; continue with: .*--resume"):
        fit(out)
    monkeypatch.undo()
    failed = json.loads((out / "results.json").read_text())
    assert failed["status"] == "failed" and "segfaulted" in failed["error"]
    assert failed["trainings"]["fit-line"]["steps"] == 7
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 7  # the failed step saved the last completed one
    again = fit(out, resume=True)
    assert again["loss_after"] == ref["loss_after"] and again["queries"] == ref["queries"]
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "train.json").read_text())["elapsed_s"] > saved["elapsed"] > 0  # cumulative


def test_a_damaged_checkpoint_falls_back_to_the_recovery_copy(tmp_path):
    from bbzo.checkpoint import RecoveredCheckpointWarning

    ref = fit(tmp_path / "ref")
    out = tmp_path / "d"
    fit(out, steps=7)  # checkpoints at 3, 6 and the final one at 7
    (out / "checkpoint.pt").write_bytes(b"\x00" * 100)
    with pytest.warns(RecoveredCheckpointWarning):
        res = fit(out, resume=True, steps=12)
    assert res["steps"] == 12
    assert res["queries"] == ref["queries"]


def test_the_generated_command_takes_flags_and_a_config_file(tmp_path):
    cmd = task_command(TASK, "fit")
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(f"steps: 4\nlr: 0.1\nout: {tmp_path / 'from-file'}\nno_progress: true\n")
    r = CliRunner().invoke(cmd, ["--config", str(cfg), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "| estimator | queries | loss before | loss after |" in r.output and "loss.png" in r.output
    text = (tmp_path / "c" / "config.resolved.yaml").read_text()
    assert "steps: 4  # from config" in text and "  # from command line" in text
    assert not (tmp_path / "from-file").exists()
    r = CliRunner().invoke(main, ["run", "--import", str(EXAMPLE), "fit-line", "--help"])
    assert r.exit_code == 0 and "--max-queries" in r.output and "--estimator [cge|rge]" in r.output
    r = CliRunner().invoke(main, ["run", "--import", str(EXAMPLE), "fit-line", "--steps", "3", "--no-progress",
                                  "--out", str(tmp_path / "via-run")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "via-run" / "results.json").read_text())["steps"] == 3
    r = CliRunner().invoke(main, ["run"])
    assert "fit-line" in r.output and "projectile" in r.output and "sol" in r.output
