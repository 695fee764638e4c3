"""CIFAR-10 end to end on tiny generated images: readers, models, exact batches, DeepZero lowers the loss and resumes."""

import json
import pickle

import pytest
import torch
from click.testing import CliRunner

from bbzo.cli.main import main
from bbzo.config import resolve
from bbzo.errors import ConfigError
from bbzo.models import create_model
from bbzo.run import run_task
from bbzo.tasks.cifar import TASK, CifarBatches, CifarSettings, load_data, load_image_classification
from bbzo.tasks.cifar.settings import parse_lr
from tests.helpers import tiny_cifar_npz, tiny_images


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return tiny_cifar_npz(tmp_path_factory.mktemp("c10") / "tiny.npz")


def write_batches_folder(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = tiny_images(n, i)
        blob = {b"data": x.transpose(0, 3, 1, 2).reshape(n, -1), b"labels": y.tolist()}
        (folder / name).write_bytes(pickle.dumps(blob))
    return folder


def test_both_readers_give_the_same_layout_and_a_missing_file_is_named(npz, tmp_path):
    x, y = load_image_classification(npz, "train", normalize=False)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(y, torch.arange(200) % 10)
    folder = write_batches_folder(tmp_path)
    x, y = load_image_classification(tmp_path, "train", normalize=False)  # the parent of the folder works too
    assert x.shape == (100, 3, 32, 32) and y.shape == (100,)
    ref, _ = tiny_images(20, 0)
    assert torch.equal((x[:20] * 255).round().to(torch.uint8), torch.from_numpy(ref).permute(0, 3, 1, 2))
    vx, _ = load_image_classification(folder, "test")
    assert vx.shape == (20, 3, 32, 32)
    (folder / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="missing data_batch_3"):
        load_image_classification(folder, "train")
    with pytest.raises(ConfigError, match="never downloads"):
        load_data(None)
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(tmp_path / "nowhere")
    d = load_data(npz, subset=50, test_subset=20)
    assert d.train_x.shape[0] == 50 and torch.equal(torch.bincount(d.train_y), torch.full((10,), 5))
    assert d.classes[0] == "airplane" and d.test_x.shape[0] == 20


@pytest.mark.parametrize("name,count", [("simple_cnn_730", 730), ("simple_cnn_3700", 3700), ("simple_cnn_6670", 6670),
                                        ("simple_cnn_9640", 9640), ("simple_cnn_12610", 12610), ("resnet20", 269_722)])
def test_every_model_has_the_papers_parameter_count_and_is_listed(name, count):
    assert sum(p.numel() for p in create_model(name).parameters()) == count
    assert name in CliRunner().invoke(main, ["models"]).output


def test_batches_and_augmentation_are_a_function_of_seed_and_step(npz):
    d = load_data(npz)
    a = CifarBatches(d.train_x, d.train_y, 32, seed=3)
    walked = [a.get_batch(s) for s in range(9)]  # crosses an epoch (6 steps per epoch)
    fresh = CifarBatches(d.train_x, d.train_y, 32, seed=3)
    for s in (8, 2, 7):  # any order, a fresh object: the same batch
        x, y = fresh.get_batch(s)
        assert torch.equal(x, walked[s][0]) and torch.equal(y, walked[s][1])
    assert not torch.equal(walked[0][0], walked[6][0])  # a new epoch permutes again
    # each augmented image is its source image, shifted by at most 4 px (zero padding) and maybe flipped
    plain = CifarBatches(d.train_x, d.train_y, 32, seed=3, augment=False)
    idx = a.indices(1)
    src = torch.nn.functional.pad(d.train_x[idx], (4, 4, 4, 4))
    aug = a._augment(d.train_x[idx], 1)
    for k in range(4):
        cands = [src[k, :, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(aug[k], c) or torch.equal(aug[k], c.flip(-1)) for c in cands)
    assert not torch.equal(plain.get_batch(1)[0], a.get_batch(1)[0])
    assert torch.equal(plain.get_batch(1)[1], a.get_batch(1)[1])


def settings(npz, tmp_path, **kw):
    base = dict(data=npz, model="simple_cnn_730", batch=20, steps=8, lr=0.05, warmup_epochs=0.0, sparsity=0.5,
                score_q=4, resample_every=3, checkpoint_every=2, eval_every=4, no_progress=True, no_plots=True,
                out=tmp_path / "run", method=("deepzero",))
    s, _ = resolve(CifarSettings, {**base, **kw})
    return s


def test_deepzero_lowers_the_loss_and_resumes_bitwise(npz, tmp_path):
    torch.set_num_threads(1)
    s = settings(npz, tmp_path)
    res = run_task(TASK, s)
    t = res["results"][0]
    assert t["method"] == "deepzero" and t["steps"] == 8
    assert t["test_loss"] < json.loads((s.out / "deepzero" / "train.json").read_text())["eval_initial"]["test_loss"]
    summary = json.loads((s.out / "deepzero" / "train.json").read_text())
    # 50% of the 666 conv/linear weights (at ZO-GraSP's ratios) + the 64 BN and bias coordinates + the base
    assert summary["queries_per_step"] == 333 + 64 + 1 and summary["score_queries"] > 0
    assert summary["queries"] == 8 * 398 + summary["score_queries"]
    rows = [json.loads(line) for line in (s.out / "deepzero" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_test_acc" in r] == [4, 8]
    # the same run stopped after 4 steps and resumed to 8 ends bitwise where the straight run ended
    s2 = settings(npz, tmp_path, out=tmp_path / "resumed", steps=4, schedule="constant")
    s3 = settings(npz, tmp_path, out=tmp_path / "straight", schedule="constant")
    run_task(TASK, s2)
    run_task(TASK, settings(npz, tmp_path, out=tmp_path / "resumed", schedule="constant", resume=True))
    run_task(TASK, s3)
    a = torch.load(tmp_path / "resumed" / "deepzero" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "deepzero" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_every_method_trains_with_its_query_count_and_eval_writes_the_per_class_table(npz, tmp_path):
    torch.set_num_threads(1)
    s = settings(npz, tmp_path, method=("fo", "cge", "rge"), steps=2, no_plots=False)
    res = run_task(TASK, s)
    by = {r["method"]: r for r in res["results"]}
    assert by["cge"]["queries_per_step"] == 731 and by["rge"]["queries_per_step"] == 731
    assert by["fo"]["zeroth_order"] is False and by["cge"]["zeroth_order"] is True
    assert (s.out / "curves.png").stat().st_size > 10_000 and "| CGE |" in (s.out / "results.md").read_text()
    for r in by.values():  # s/epoch is the steps' time alone: set-up (data, model, a score) is apart
        assert r["setup_s"] is not None and r["train_s"] <= r["wall_s"]
        assert r["train_s_per_epoch"] == pytest.approx(r["train_s"] / r["epochs"], abs=0.01)
    assert "s/epoch (steps only)" in (s.out / "results.md").read_text()
    r = CliRunner().invoke(main, ["cifar", "eval", str(s.out)])
    assert r.exit_code == 0, r.output
    ev = json.loads((s.out / "eval.json").read_text())
    assert set(ev["methods"]) == {"fo", "cge", "rge"} and len(ev["methods"]["cge"]["per_class"]) == 10
    assert ev["methods"]["cge"]["test_acc"] == by["cge"]["test_acc"]
    assert "| airplane |" in r.output and "**all**" in r.output
    (s.out / "cge" / "model.pt").write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(main, ["cifar", "eval", str(s.out)])
    assert r.exit_code == 2 and "retrain that method" in r.output


def test_bad_settings_get_clear_errors(npz, tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'sgd'"):
        settings(npz, tmp_path, method=("sgd",))
    r = CliRunner().invoke(main, ["cifar", "train", "--out", str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code == 2 and "--data PATH" in r.output


def test_a_warm_up_longer_than_the_run_is_named_and_a_full_run_is_not(npz, tmp_path):
    from bbzo.errors import InefficientSettingsWarning
    from bbzo.tasks.cifar.methods import warn_if_never_decays

    with pytest.warns(InefficientSettingsWarning, match="is 30 steps, and the run has 2.*never decays"):
        run_task(TASK, settings(npz, tmp_path, method=("fo",), steps=2, warmup_epochs=3.0, eval_every=0))
    assert warn_if_never_decays(30, 300, "--warmup-epochs 3", 0.1) is False  # warms up, then decays
    assert warn_if_never_decays(0, 3, "--warmup-epochs 0", 0.1) is False


def test_each_method_trains_at_its_own_learning_rate_from_the_command_line(npz, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "per_method"
    r = CliRunner().invoke(main, ["cifar", "train", "--preset", "fig2", "--data", str(npz), "--method", "fo,cge",
                                  "--lr", "fo=0.05,cge=0.3", "--batch", "20", "--steps", "2", "--schedule", "constant",
                                  "--no-progress", "--no-plots", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for method, rate in (("fo", 0.05), ("cge", 0.3)):
        rows = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert [row["lr"] for row in rows if "lr" in row] == [rate, rate]
    # one number is every method's rate; a method left out of a per-method list is named
    s = settings(npz, tmp_path, lr="0.2", method=("fo", "rge"))
    assert (s.lr_of("fo"), s.lr_of("rge")) == (0.2, 0.2)
    with pytest.raises(ConfigError, match="names no rate for rge; add rge=RATE"):
        settings(npz, tmp_path, lr="fo=0.1,cge=0.1", method=("fo", "rge"))
    with pytest.raises(ConfigError, match="unknown method 'adam'"):
        settings(npz, tmp_path, lr="adam=0.1")
    # the fig2 preset gives every method its own screened rate
    s, _ = resolve(CifarSettings, {"preset": "fig2", "data": npz})
    assert set(parse_lr(s.lr)) == {"fo", "cge", "rge"}


def test_validation_images_are_held_out_of_training_the_same_for_every_seed(npz):
    a = load_data(npz, val_images=50, seed=0)
    b = load_data(npz, val_images=50, seed=3)
    assert a.train_x.shape[0] == 150 and a.test_x.shape[0] == 50 and torch.equal(a.test_x, b.test_x)
    assert torch.bincount(a.test_y, minlength=10).tolist() == [5] * 10
    full = load_data(npz)
    rows = {tuple(r) for r in full.train_x.flatten(1)[:, :64].tolist()}
    held = [tuple(r) for r in a.test_x.flatten(1)[:, :64].tolist()]
    kept = {tuple(r) for r in a.train_x.flatten(1)[:, :64].tolist()}
    assert all(h in rows and h not in kept for h in held)
