"""The certified defense on tiny generated images: CERTIFY's exact bounds, the plane-add trick, the query ledger
of a fine-tuning step, pretrain -> finetune -> certify through the CLI (an .npz and an ImageFolder of JPEGs),
class maps, any denoiser, the resumable certification, and the errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from scipy.stats import binomtest, norm
from torch import nn

import bbzo
from bbzo.adapters.linear_delta import conv_weight_delta
from bbzo.cli.main import main
from bbzo.errors import ConfigError
from bbzo.models.dncnn import DnCNN
from bbzo.tasks.defense import (ABSTAIN, FinetuneSettings, certified_accuracy, certified_table, certify,
                                certify_dataset, lower_confidence_bound, max_radius, predict)
from bbzo.tasks.defense.methods import budget_ratios
from bbzo.tasks.defense.denoisers import dncnn_spec, record
from bbzo.sparsity import LayerRatios
from tests.helpers import grad

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class TinyNet(nn.Module):
    """The black box of the tests (importable as tests.tasks.test_defense:TinyNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                               nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.f(x)


IMAGENETTE4 = ("n01440764", "n02102040", "n02979186", "n03000684")  # Imagenette's first four wnids


class Wide1000(nn.Module):
    """A 1000-class classifier whose outputs 0, 217, 482, 491 (Imagenette's first four classes) are TinyNet's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x):
        out = torch.full((x.shape[0], 1000), -1e4)
        out[:, [0, 217, 482, 491]] = self.net(x)
        return out


class TinyDenoiser(nn.Module):
    """A user's denoiser that is not a DnCNN (no `dncnn` layers): x - conv(relu(conv(x)))."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.out = nn.Conv2d(width, 3, 3, padding=1, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, x):
        return x - self.out(torch.relu(self.inp(x)))


def images(n, seed):
    """``(n, 12, 12, 3)`` uint8: class c = i % 4 is a horizontal or vertical grating of a class colour."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 4
    t = np.linspace(0, 1, 12)
    x = np.zeros((n, 12, 12, 3))
    for i, c in enumerate(y):
        wave = 0.5 + 0.4 * np.sin(2 * np.pi * (1 + c // 2) * (t[:, None] if c % 2 else t[None, :]) + g.uniform(0, 6))
        x[i] = wave[..., None] * np.array([0.3 + 0.2 * c, 0.9 - 0.2 * c, 0.5])[None, None]
    return (x * 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("defense")
    tx, ty = images(96, 0)
    vx, vy = images(24, 1)
    np.savez(root / "toy.npz", x_train=tx, y_train=ty, x_val=vx, y_val=vy)
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.tensor(tx).permute(0, 3, 1, 2).float() / 255
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        loss = F.cross_entropy(net((x - m) / s), torch.tensor(ty))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), root / "clf.pt")
    torch.save({f"net.{k}": v for k, v in net.state_dict().items()}, root / "wide.pt")
    torch.manual_seed(1)
    den = DnCNN(4, 8)
    with torch.no_grad():
        den.last.weight.normal_(0, 0.05)
    torch.save(record(den, dncnn_spec(4, 8)).state_dict(), root / "den.pt")  # a "pretrained" denoiser
    return root


def image_folder(root, size=(40, 36), per_split=(16, 8)):
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: the 4-class gratings as JPEGs of ``size``."""
    from PIL import Image

    for split, n, seed in (("train", per_split[0], 0), ("val", per_split[1], 1)):
        x, y = images(n, seed)
        for i, (img, c) in enumerate(zip(x, y)):
            folder = root / split / IMAGENETTE4[c]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize(size, Image.BICUBIC).save(folder / f"img{i:03d}.JPEG", quality=95)
    return root


def common(root):
    return ["--data", str(root / "toy.npz"), "--classifier", "tests.tasks.test_defense:TinyNet", "--weights",
            str(root / "clf.pt"), "--num-classes", "4", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
            "--depth", "4", "--width", "8", "--no-progress"]


# ------------------------------------------------------------------------------------------- CERTIFY
def constant(cls, k=4):
    return lambda z: F.one_hot(torch.full((z.shape[0],), cls), k).float()


def test_an_always_correct_classifier_certifies_exactly_the_largest_radius_n_allows():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 4)
    for n, alpha, sigma in ((100, 0.001, 0.25), (1000, 0.01, 0.5)):
        cls, radius = certify(constant(2), x, sigma, n0=10, n=n, alpha=alpha, batch=64, generator=g)
        assert cls == 2
        assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)
        assert radius == pytest.approx(max_radius(sigma, n, alpha), rel=1e-12)


def test_a_random_classifier_abstains():
    gen = torch.Generator().manual_seed(1)
    rand = lambda z: torch.rand(z.shape[0], 10, generator=gen)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    assert certify(rand, torch.rand(3, 4, 4), 0.25, n0=20, n=200, alpha=0.001, batch=50, generator=g) == (ABSTAIN, 0.0)
    assert predict(rand, torch.rand(3, 4, 4), 0.25, n=200, alpha=0.001, batch=50, generator=g) == ABSTAIN
    assert predict(constant(1), torch.rand(3, 4, 4), 0.25, n=50, alpha=0.001, batch=50, generator=g) == 1


def test_the_clopper_pearson_bound_is_scipys_exact_one_sided_interval():
    for n_a, n in ((9990, 10000), (600, 1000), (1, 10)):
        ref = binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * 0.001, method="exact").low
        assert lower_confidence_bound(n_a, n, 0.001) == pytest.approx(ref, rel=1e-9)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    with pytest.raises(ConfigError):
        lower_confidence_bound(11, 10, 0.001)


def test_the_certified_accuracy_table_of_a_hand_made_per_image_table():
    rows = [{"predict": 0, "label": 0, "correct": 1, "radius": 0.8},
            {"predict": 1, "label": 1, "correct": 1, "radius": 0.3},
            {"predict": 2, "label": 1, "correct": 0, "radius": 0.9},  # wrong, however large its radius
            {"predict": ABSTAIN, "label": 3, "correct": 0, "radius": 0.0}]
    acc = certified_accuracy(rows, (0.0, 0.25, 0.5, 0.75, 1.0))
    assert acc == {"0": 50.0, "0.25": 50.0, "0.5": 25.0, "0.75": 25.0, "1": 0.0}
    table = certified_table({"zo": acc}, 4)
    assert "| DeepZero (ZO, Sparse-CGE) | 50.00 | 50.00 | 25.00 | 25.00 | 0.00 |" in table
    assert "paper: FO-DS" in table


def test_certify_dataset_rows_do_not_depend_on_which_images_are_certified():
    imgs, labels = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 0, 1])

    def f(z):
        return torch.stack([z.mean((1, 2, 3)), 1 - z.mean((1, 2, 3)), 0 * z[:, 0, 0, 0], 0 * z[:, 0, 0, 0]], 1)
    kw = dict(sigma=0.25, n0=5, n=40, alpha=0.01, batch=16, seed=3)
    every = certify_dataset(f, imgs, labels, **kw)
    some = certify_dataset(f, imgs, labels, indices=[4], **kw)
    assert {k: v for k, v in every[4].items() if k != "seconds"} == {k: v for k, v in some[0].items() if k != "seconds"}


# ------------------------------------------------------------------------------------------- the ZO part
def test_the_plane_add_trick_equals_a_real_conv_of_the_last_layer():
    torch.manual_seed(0)
    den = DnCNN(4, 8).double().eval()
    last = den.last
    with torch.no_grad():
        last.weight.normal_()
    h = torch.randn(5, 8, 6, 6, dtype=torch.float64)  # the cached body features
    index = torch.tensor([0, 17, 100, last.weight.numel() - 1])
    channel, delta = conv_weight_delta(last, h, index)
    base = last(h)
    mu = 1e-3
    for k, i in enumerate(index.tolist()):
        w = last.weight.detach().clone()
        w.view(-1)[i] += mu
        real = F.conv2d(h, w, padding=1)
        plane = base.detach().clone()
        plane[:, int(channel[k])] += mu * delta[k]
        assert torch.allclose(plane, real, atol=1e-12, rtol=0)


def test_zo_cge_on_the_last_layer_through_the_staged_adapter_equals_a_naive_loop():
    torch.manual_seed(0)
    den = DnCNN(4, 8).double().eval()
    with torch.no_grad():
        den.last.weight.normal_(0, 0.1)
    for n, p in den.named_parameters():
        p.requires_grad_(n == "dncnn.8.weight")
    f = TinyNet().double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])

    def loss(out, t):
        return F.cross_entropy(f(out), t, reduction="none")
    mu = 1e-4
    grads = grad(den, loss, x, y, bbzo.create_estimator("cge", mu=mu))["dncnn.8.weight"].flatten()
    w = den.last.weight
    with torch.no_grad():
        base = loss(den(x), y).mean()
        naive = torch.zeros(w.numel(), dtype=torch.float64)
        for i in range(w.numel()):
            w.view(-1)[i] += mu
            naive[i] = (loss(den(x), y).mean() - base) / mu
            w.view(-1)[i] -= mu
    assert torch.allclose(grads, naive, atol=1e-8, rtol=1e-6)


def test_budget_ratios_split_the_budget_in_proportion_and_exactly():
    lpr = LayerRatios(kept={"a": 30, "b": 10, "c": 0}, size={"a": 100, "b": 100, "c": 50}, sparsity=0.84)
    plan = budget_ratios(lpr, {"a": 100, "b": 100}, 41)
    assert plan.total_kept == 41 and plan.kept["a"] in (30, 31) and plan.kept["b"] in (10, 11)
    assert budget_ratios(lpr, {"c": 50}, 80).kept == {"c": 50}  # no score: uniform, capped at the size


# ------------------------------------------------------------------------------------------- end to end
def test_pretrain_finetune_and_certify_through_the_cli_with_an_exact_query_ledger(setup, tmp_path):
    root, runner = setup, CliRunner()
    r = runner.invoke(main, ["defense", "pretrain", *common(root), "--steps", "12", "--batch", "16", "--lr", "1e-2",
                             "--out", str(tmp_path / "pre")])
    assert r.exit_code == 0, r.output
    pre = json.loads((tmp_path / "pre" / "results.json").read_text())["results"]
    assert pre["test_psnr"] > pre["test_psnr_before"] + 1.0  # the denoiser learned to denoise
    den = tmp_path / "pre" / "model.pt"
    steps, batch, budget = 3, 8, 50
    r = runner.invoke(main, ["defense", "finetune", *common(root), "--denoiser", str(den), "--method", "zo,fo,zo-ds",
                             "--steps", str(steps), "--batch", str(batch), "--budget", str(budget), "--q", "6",
                             "--score-q", "4", "--lr", "1e-3", "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    zo = json.loads((tmp_path / "ft" / "zo" / "train.json").read_text())
    assert zo["tuned"] == ["dncnn.8.weight"] and zo["coords_per_step"] == budget
    assert zo["queries_per_step"] == budget + 1
    # every row the classifier answered is charged: ZO-GraSP's queries of one batch, then (budget + 1) x batch per step
    assert zo["ledger"]["oracles"]["classifier"]["rows"] == (zo["score_queries"] + steps * (budget + 1)) * batch
    assert zo["queries"] == zo["score_queries"] + steps * (budget + 1)
    evals = zo["ledger"]["oracles"]["classifier"]["eval_rows"]
    assert evals >= 2 * 24 and evals % 24 == 0  # the noisy test accuracy: uncharged, but counted apart
    zods = json.loads((tmp_path / "ft" / "zo-ds" / "train.json").read_text())
    assert zods["ledger"]["oracles"]["classifier"]["rows"] == steps * 7 * batch  # q + 1 per step
    fo = json.loads((tmp_path / "ft" / "fo" / "train.json").read_text())
    assert fo["zeroth_order"] is False and fo["ledger"]["oracles"]["classifier"]["rows"] == 0
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["label_queries"] == 96  # argmax f(x) of every training image, once
    r = runner.invoke(main, ["defense", "certify", *common(root), "--denoisers",
                             f"{{mse: {den}, zo: {tmp_path / 'ft' / 'zo' / 'model.pt'}}}", "--n0", "5", "--n", "40",
                             "--skip", "3", "--out", str(tmp_path / "cert")])
    assert r.exit_code == 0, r.output
    cert = json.loads((tmp_path / "cert" / "results.json").read_text())
    assert set(cert["certified_accuracy"]) == {"none", "mse", "zo"} and cert["images"] == 8
    assert cert["classifier_queries"]["zo"] == 8 * 45
    lines = (tmp_path / "cert" / "zo" / "certify.tsv").read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\tnA\tpA_lower\tseconds" and len(lines) == 9
    assert (tmp_path / "cert" / "certified_accuracy.png").stat().st_size > 1000
    table = (tmp_path / "cert" / "results.md").read_text()
    assert "r = 0.25" in table and "Classifier queries (images): none 360, mse 360, zo 360" in table
    assert f"The largest radius n = 40 samples can certify is {max_radius(0.25, 40, 0.001):.3f}" in table
    assert "Classifier queries (images): none 360" in r.output  # the console says it too
    ft = (tmp_path / "ft" / "results.md").read_text()
    # ZO-DS says the q it ran with; parameter sets and classifier images are two columns; the label queries are named
    assert "ZO-DS (chain-rule RGE, q = 6)" in ft and "q = 192" not in ft
    zo_row = next(line for line in ft.splitlines() if line.startswith("| DeepZero"))
    cells = [c.strip() for c in zo_row.split("|")[1:-1]]
    assert cells[1] == f"{budget + 1}" and cells[3] == f"{zo['queries']:,} (score {zo['score_queries']:,})"
    assert cells[4] == f"{zo['oracle_rows']:,}" and zo["oracle_rows"] == zo["queries"] * batch
    assert "Label queries: 96 classifier images" in ft


def test_finetune_resumes_bitwise(setup, tmp_path):
    root, runner = setup, CliRunner()
    r = runner.invoke(main, ["defense", "pretrain", *common(root), "--steps", "2", "--batch", "16", "--out",
                             str(tmp_path / "pre")])
    assert r.exit_code == 0, r.output
    args = [*common(root), "--denoiser", str(tmp_path / "pre" / "model.pt"), "--method", "zo", "--batch", "8",
            "--budget", "30", "--score-q", "4", "--lr", "1e-3", "--resample-every", "2", "--checkpoint-every", "2"]
    assert runner.invoke(main, ["defense", "finetune", *args, "--steps", "4", "--out", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(main, ["defense", "finetune", *args, "--steps", "2", "--out", str(tmp_path / "b")]).exit_code == 0
    r = runner.invoke(main, ["defense", "finetune", *args, "--steps", "4", "--resume", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    a = torch.load(tmp_path / "a" / "zo" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "zo" / "model.pt", weights_only=True)
    assert a["_extra_state"] == b["_extra_state"] == {"format": "bbzo-denoiser/1", "arch": "dncnn",
                                                     "kwargs": {"depth": 4, "width": 8}}
    assert all(torch.equal(a[k], b[k]) for k in a if k != "_extra_state")


def test_bad_inputs_get_clear_errors(setup, tmp_path):
    root, runner = setup, CliRunner()
    r = runner.invoke(main, ["defense", "finetune", *common(root), "--denoiser", str(tmp_path / "none.pt"),
                             "--steps", "1", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "does not exist" in r.output
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage" * 20)
    r = runner.invoke(main, ["defense", "finetune", *common(root), "--denoiser", str(corrupt), "--steps", "1",
                             "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and f"denoiser {corrupt} cannot be read" in r.output and "weights_only" not in r.output
    other = tmp_path / "other.pt"
    torch.save(DnCNN(5, 8).state_dict(), other)  # a file that records no architecture, of another depth
    r = runner.invoke(main, ["defense", "finetune", *common(root), "--denoiser", str(other), "--steps", "1",
                             "--out", str(tmp_path / "y2")])
    assert r.exit_code != 0 and "is not a DnCNN(depth=4, width=8) state dict" in r.output
    assert "check --denoiser-arch/--depth/--width" in r.output
    r = runner.invoke(main, ["defense", "certify", *common(root), "--denoisers", "{zo: nowhere.pt}", "--out",
                             str(tmp_path / "z")])
    assert r.exit_code != 0 and "denoiser zo: nowhere.pt does not exist" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(main, ["defense", "certify", *common(root), "--device", "cuda", "--out", str(tmp_path / "gpu")])
        assert r.exit_code != 0 and "no CUDA device is visible" in r.output
    with pytest.raises(ConfigError, match="unknown method"):
        FinetuneSettings(method=("sgd",))


def test_the_shipped_gpu_config_names_only_real_settings_of_each_command():
    from pathlib import Path

    from bbzo.config import file_values
    from bbzo.tasks.defense import CertifySettings, PretrainSettings

    path = Path(__file__).resolve().parents[2] / "examples" / "defense" / "imagenet10_gpu.yaml"
    for cls, command in ((PretrainSettings, "pretrain"), (FinetuneSettings, "finetune"), (CertifySettings, "certify")):
        values = file_values(path, cls, command)
        assert values["device"] == "cuda" and values["depth"] == 17 and values["classifier"] == "resnet50"
    assert file_values(path, FinetuneSettings, "finetune")["budget"] == 1152


# ------------------------------------------------------------------------------------------- at a user's scale
def tsv(path, drop=("seconds",)):
    """A table's rows without its timing column."""
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if name not in drop]
    return [[row[i] for i in keep] for row in lines]


def test_an_image_folder_of_jpegs_runs_pretrain_finetune_zo_and_certify_at_32_and_224_px(setup, tmp_path):
    root, runner = setup, CliRunner()
    data = image_folder(tmp_path / "folder", size=(40, 36))
    cli = ["--data", str(data), "--classifier", "tests.tasks.test_defense:TinyNet", "--weights", str(root / "clf.pt"),
           "--num-classes", "4", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--depth", "4", "--width", "8",
           "--no-progress", "--no-plots", "--loader-workers", "0"]
    small = [*cli, "--image-size", "32"]
    r = runner.invoke(main, ["defense", "pretrain", *small, "--steps", "3", "--batch", "8", "--lr", "1e-2",
                             "--loader-workers", "1", "--out", str(tmp_path / "pre")])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "pre" / "data.json").read_text())
    assert info["classes"] == list(IMAGENETTE4) and info["image_shape"] == [3, 32, 32] and info["layout"] == "imagefolder"
    assert info["train_images"] == 16 and info["test_images"] == 8
    den = tmp_path / "pre" / "model.pt"
    r = runner.invoke(main, ["defense", "finetune", *small, "--denoiser", str(den), "--method", "zo", "--steps", "2",
                             "--batch", "4", "--budget", "20", "--score-q", "2", "--lr", "1e-3", "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    zo = json.loads((tmp_path / "ft" / "zo" / "train.json").read_text())
    assert zo["ledger"]["oracles"]["classifier"]["rows"] == (zo["score_queries"] + 2 * 21) * 4
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["label_queries"] == 16  # each training image once
    dens = f"{{mse: {den}, zo: {tmp_path / 'ft' / 'zo' / 'model.pt'}}}"
    for size, out in ((32, "c32"), (224, "c224")):
        r = runner.invoke(main, ["defense", "certify", *cli, "--image-size", str(size), "--denoisers", dens,
                                 "--pipelines", "none,zo", "--n0", "4", "--n", "16", "--skip", "3", "--out",
                                 str(tmp_path / out)])
        assert r.exit_code == 0, r.output
        res = json.loads((tmp_path / out / "results.json").read_text())
        assert set(res["certified_accuracy"]) == {"none", "zo"} and not (tmp_path / out / "mse").exists()
        assert res["data"]["image_shape"] == [3, size, size] and res["classifier_queries"]["zo"] == 3 * 20
        rows = tsv(tmp_path / out / "zo" / "certify.tsv")
        assert [r[0] for r in rows[1:]] == ["0", "3", "6"]  # dataset indices (val is sorted by class, then file)
        assert [r[1] for r in rows[1:]] == ["0", "1", "3"]  # val/ holds 2 images per class, in wnid order
    from bbzo.tasks.defense.data import open_images
    split = open_images(data, splits=("test",), image_size=224).test
    img, label = split[3]  # Resize(256) + CenterCrop(224) of a 40 x 36 JPEG
    assert tuple(img.shape) == (3, 224, 224) and label == 1 and 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_a_1000_class_classifier_certifies_a_4_class_set_through_the_imagenette_class_map(setup, tmp_path, monkeypatch):
    root, runner = setup, CliRunner()
    data = image_folder(tmp_path / "folder", size=(16, 16), per_split=(4, 8))
    base = ["defense", "certify", "--data", str(data), "--image-size", "16", "--mean", "0.5,0.5,0.5", "--std",
            "0.25,0.25,0.25", "--denoisers", f"{{mse: {root / 'den.pt'}}}", "--n0", "4", "--n", "20", "--skip", "2",
            "--no-progress", "--no-plots", "--loader-workers", "0", "--depth", "9", "--width", "3"]  # flags a recorded file ignores
    r = runner.invoke(main, [*base, "--classifier", "tests.tasks.test_defense:TinyNet", "--weights",
                             str(root / "clf.pt"), "--num-classes", "4", "--out", str(tmp_path / "four")])
    assert r.exit_code == 0, r.output
    from bbzo.tasks.defense import data as data_module

    def no_images(self, i):
        raise AssertionError("an image was read before the checks")
    with monkeypatch.context() as m:  # the class count is refused before any image is read
        m.setattr(data_module.FolderSplit, "__getitem__", no_images)
        r = runner.invoke(main, [*base, "--classifier", "tests.tasks.test_defense:Wide1000", "--weights",
                                 str(root / "wide.pt"), "--out", str(tmp_path / "nomap")])
    assert r.exit_code != 0 and "answers 1000 classes but" in r.output and "has 4" in r.output
    assert "--class-map" in r.output and not (tmp_path / "nomap" / "mse").exists()
    r = runner.invoke(main, [*base, "--classifier", "tests.tasks.test_defense:Wide1000", "--weights",
                             str(root / "wide.pt"), "--class-map", "imagenette", "--out", str(tmp_path / "wide")])
    assert r.exit_code == 0, r.output
    for name in ("none", "mse"):  # the mapped 1000-class model certifies exactly as the 4-class one
        assert tsv(tmp_path / "wide" / name / "certify.tsv") == tsv(tmp_path / "four" / name / "certify.tsv")
    assert json.loads((tmp_path / "wide" / "data.json").read_text())["classifier_outputs"] == [[0], [217], [482], [491]]
    acc = json.loads((tmp_path / "wide" / "results.json").read_text())["certified_accuracy"]
    assert acc["none"]["0"] > 0  # not the silent 0% of an unmapped 1000-class model


def test_the_builtin_imagenette_map_matches_timms_imagenet_synsets_and_map_files_are_checked(tmp_path):
    from pathlib import Path

    import timm

    from bbzo.tasks.defense.classmap import IMAGENETTE_TO_IMAGENET1K, resolve_class_map

    synsets = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert len(synsets) == 1000
    for wnid, index in IMAGENETTE_TO_IMAGENET1K.items():
        assert synsets[index] == wnid
    wnids = list(IMAGENETTE_TO_IMAGENET1K)
    assert resolve_class_map("imagenette", wnids) == [[i] for i in IMAGENETTE_TO_IMAGENET1K.values()]
    f = tmp_path / "map.yaml"
    f.write_text("cat: 281\ndog: [151, 152, 153]\n")
    assert resolve_class_map(str(f), ["dog", "cat"]) == [[151, 152, 153], [281]]
    with pytest.raises(ConfigError, match="no entry for the data's class 'bird'"):
        resolve_class_map(str(f), ["dog", "cat", "bird"])
    f.write_text("cat: 281\ndog: [151, 152, 153]\nbird: 12\n")
    with pytest.raises(ConfigError, match="names classes the data does not have: bird"):
        resolve_class_map(str(f), ["dog", "cat"])
    f.write_text("[5, [7, 8]]")  # a list: one entry per data label
    assert resolve_class_map(str(f), ["a", "b"]) == [[5], [7, 8]]


def test_a_module_attr_denoiser_pretrains_finetunes_with_zo_and_certifies_and_records_its_architecture(setup, tmp_path):
    root, runner = setup, CliRunner()
    r = runner.invoke(main, ["defense", "pretrain", *common(root), "--denoiser-arch", "tests.tasks.test_defense:TinyDenoiser",
                             "--denoiser-kwargs", "{width: 5}", "--steps", "3", "--batch", "16", "--lr", "1e-2",
                             "--out", str(tmp_path / "pre")])
    assert r.exit_code == 0, r.output
    den = tmp_path / "pre" / "model.pt"
    state = torch.load(den, weights_only=True)
    assert state["_extra_state"] == {"format": "bbzo-denoiser/1", "arch": "tests.tasks.test_defense:TinyDenoiser",
                                     "kwargs": {"width": 5}}
    # finetune and certify name only the file: the architecture comes from it (the flags say DnCNN 4 x 8)
    r = runner.invoke(main, ["defense", "finetune", *common(root), "--denoiser", str(den), "--method", "zo",
                             "--steps", "2", "--batch", "8", "--budget", "40", "--score-q", "2", "--lr", "1e-3",
                             "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    zo = json.loads((tmp_path / "ft" / "zo" / "train.json").read_text())
    assert zo["tuned"] == ["out.weight"] and zo["coords_per_step"] == 40 and zo["queries_per_step"] == 41
    tuned = torch.load(tmp_path / "ft" / "zo" / "model.pt", weights_only=True)
    assert tuned["_extra_state"] == state["_extra_state"] and torch.equal(tuned["inp.weight"], state["inp.weight"])
    assert not torch.equal(tuned["out.weight"], state["out.weight"])  # the last layer moved, the first did not
    r = runner.invoke(main, ["defense", "certify", *common(root), "--denoisers",
                             f"{{zo: {tmp_path / 'ft' / 'zo' / 'model.pt'}, direct: tests.tasks.test_defense:TinyDenoiser}}",
                             "--pipelines", "zo,direct", "--n0", "4", "--n", "16", "--skip", "6", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    assert res["denoisers"]["zo"]["denoiser"]["arch"] == "tests.tasks.test_defense:TinyDenoiser"
    # an untrained TinyDenoiser is the identity (its last conv is zero): it certifies as the classifier alone would
    assert res["classifier_queries"] == {"zo": 4 * 20, "direct": 4 * 20}


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_compiled_denoiser_is_fine_tuned_through_a_small_adapter_after_it(setup, tmp_path):
    root, runner = setup, CliRunner()
    torch.manual_seed(0)
    den = DnCNN(4, 8).eval()
    with torch.no_grad():
        den.last.weight.normal_(0, 0.05)
    ts = tmp_path / "den.ts"
    torch.jit.save(torch.jit.trace(den, torch.rand(1, 3, 12, 12)), str(ts))
    args = [*common(root), "--denoiser", str(ts), "--method", "zo", "--steps", "2", "--batch", "8", "--budget", "30",
            "--score-q", "2", "--lr", "1e-3"]
    r = runner.invoke(main, ["defense", "finetune", *args, "--out", str(tmp_path / "no")])
    assert r.exit_code != 0 and "bbzo cannot perturb its weights" in r.output and "--adapter-width" in r.output
    r = runner.invoke(main, ["defense", "finetune", *args, "--adapter-width", "4", "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    zo = json.loads((tmp_path / "ft" / "zo" / "train.json").read_text())
    assert zo["tuned"] == ["dncnn.2.weight"] and zo["params"] == 4 * 3 * 9  # only the adapter's last conv
    state = torch.load(tmp_path / "ft" / "zo" / "model.pt", weights_only=True)
    assert sorted(k for k in state if k != "_extra_state") == ["dncnn.0.bias", "dncnn.0.weight", "dncnn.2.weight"]
    assert state["_extra_state"]["base"]["source"] == str(ts.resolve()) and len(state["_extra_state"]["base"]["sha256"]) == 64
    r = runner.invoke(main, ["defense", "certify", *common(root), "--denoisers", f"{{ad: {tmp_path / 'ft' / 'zo' / 'model.pt'}, ts: {ts}}}",
                             "--pipelines", "ad,ts", "--n0", "4", "--n", "16", "--skip", "12", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    ts.write_bytes(ts.read_bytes() + b"\0")  # the frozen denoiser changed: the adapter is refused
    r = runner.invoke(main, ["defense", "certify", *common(root), "--denoisers", f"{{ad: {tmp_path / 'ft' / 'zo' / 'model.pt'}}}",
                             "--pipelines", "ad", "--n0", "4", "--n", "16", "--out", str(tmp_path / "c2")])
    assert r.exit_code != 0 and "changed since this adapter was trained" in r.output


def test_an_interrupted_certification_resumes_to_the_table_of_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    import bbzo.tasks.defense.stages as defense  # the certify stage's loop

    root, runner = setup, CliRunner()
    den = tmp_path / "den.pt"
    den.write_bytes((root / "den.pt").read_bytes())
    args = ["defense", "certify", *common(root), "--denoisers", f"{{mse: {den}}}", "--n0", "5", "--n", "30",
            "--skip", "2", "--no-plots"]
    r = runner.invoke(main, [*args, "--batch", "30", "--out", str(tmp_path / "whole")])
    assert r.exit_code == 0, r.output
    real = defense.certify_images

    def stop_after(k):
        def interrupted(*a, on_row, **kw):
            seen = []

            def row(r):
                on_row(r)
                seen.append(r)
                if len(seen) == k:
                    raise KeyboardInterrupt
            return real(*a, on_row=row, **kw)
        return interrupted
    with monkeypatch.context() as m:
        m.setattr(defense, "certify_images", stop_after(5))
        r = runner.invoke(main, [*args, "--batch", "7", "--out", str(tmp_path / "cut")])
    assert r.exit_code != 0 and "5 of 12 images of none are saved" in r.output and "--resume" in r.output
    table = tmp_path / "cut" / "none" / "certify.tsv"
    assert len(table.read_text().splitlines()) == 6 and not (tmp_path / "cut" / "mse" / "certify.tsv").exists()
    with open(table, "a") as f:
        f.write("10\t1\t")  # a row torn by the interruption
    r = runner.invoke(main, [*args, "--batch", "7", "--out", str(tmp_path / "cut")])
    assert r.exit_code != 0 and "--resume" in r.output  # a folder that holds a certification is not restarted
    r = runner.invoke(main, [*args, "--batch", "16", "--resume", "--out", str(tmp_path / "cut")])
    assert r.exit_code == 0, r.output
    for name in ("none", "mse"):  # the same rows, whatever the batch and the interruption
        assert tsv(tmp_path / "cut" / name / "certify.tsv") == tsv(tmp_path / "whole" / name / "certify.tsv")
    cut, whole = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cut", "whole"))
    assert cut["certified_accuracy"] == whole["certified_accuracy"] and cut["resumed_rows"] == {"none": 5, "mse": 0}
    assert cut["classifier_queries"] == whole["classifier_queries"] == {"none": 12 * 35, "mse": 12 * 35}
    state = torch.load(den, weights_only=True)
    state["dncnn.8.weight"] = state["dncnn.8.weight"] * 2
    torch.save(state, den)  # same path, other weights: a resume would mix two denoisers in one table
    r = runner.invoke(main, [*args, "--resume", "--out", str(tmp_path / "cut")])
    assert r.exit_code != 0 and "the denoiser file changed since mse started" in r.output


def test_predict_through_the_cli_and_noise_that_does_not_depend_on_the_batch(setup, tmp_path):
    from bbzo.tasks.defense.certify import NoiseStream, image_generator

    g = image_generator(3, 17)
    whole = torch.randn((250, 3, 4, 4), generator=g)  # one draw, as CERTIFY drew before the blocks
    stream = NoiseStream((3, 4, 4), image_generator(3, 17))
    parts = torch.cat([stream.take(b) for b in (7, 93, 1, 149)])
    assert torch.equal(parts, whole)
    odd = [NoiseStream((3, 5, 5), image_generator(0, 1)) for _ in range(2)]  # 75 values: blocks keep it fixed too
    assert torch.equal(torch.cat([odd[0].take(b) for b in (3, 130)]), torch.cat([odd[1].take(b) for b in (100, 33)]))
    runner = CliRunner()
    r = runner.invoke(main, ["defense", "certify", *common(setup), "--denoisers", f"{{mse: {setup / 'den.pt'}}}",
                             "--pipelines", "mse", "--predict", "--n", "40", "--skip", "4", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    rows = tsv(tmp_path / "p" / "mse" / "predict.tsv")
    assert rows[0] == ["idx", "label", "predict", "correct", "nA", "nB", "p_value"] and len(rows) == 7
    assert res["mode"] == "predict" and list(res["predicted_accuracy"]) == ["mse"] and res["classifier_queries"]["mse"] == 6 * 40
    for row in rows[1:]:  # PREDICT abstains exactly when the top-two binomial test is not significant
        assert (float(row[6]) > 0.001) == (row[2] == "-1")
    assert "PREDICT accuracy" in (tmp_path / "p" / "results.md").read_text()


def test_image_folder_batches_are_a_function_of_the_step_with_or_without_loader_workers(tmp_path):
    from bbzo.tasks.defense.data import NoisyBatches, open_images

    data = open_images(image_folder(tmp_path / "f", size=(20, 24), per_split=(12, 4)), image_size=16, subset=8)
    assert data.train_rows.tolist() == sorted(data.train_rows.tolist()) and data.train_rows.numel() == 8
    streamed = NoisyBatches(data.train, None, 3, 0.1, seed=3, rows=data.train_rows, workers=1)
    direct = NoisyBatches(data.train, None, 3, 0.1, seed=3, rows=data.train_rows, workers=0)
    for step in (0, 0, 1, 4, 5, 2, 2, 3):  # repeats and jumps (a score's batch, a resume) restart the prefetch
        noisy, clean = streamed.get_batch(step)
        assert torch.equal(noisy, direct.get_batch(step)[0])
        rows = data.train_rows[streamed.order.indices(step)]
        assert torch.equal(clean, torch.stack([data.train[int(i)][0] for i in rows]))


# ------------------------------------------------------------------------------------ classifier, presets, docs
def test_the_classifier_command_trains_a_black_box_the_other_stages_load(setup, tmp_path):
    from bbzo.oracles.classifier import load_classifier
    from bbzo.tasks.defense.classifier import clean_accuracy

    root, runner = setup, CliRunner()
    r = runner.invoke(main, ["defense", "classifier", "--data", str(root / "toy.npz"), "--classifier", "timm:test_resnet",
                             "--steps", "4", "--batch", "16", "--lr", "0.05", "--no-progress", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    assert res["use_with"] == f"--classifier timm:test_resnet --weights {tmp_path / 'c' / 'model.pt'} --num-classes 4"
    assert res["use_with"] in r.output and res["results"]["steps"] == 4
    net = load_classifier("timm:test_resnet", tmp_path / "c" / "model.pt", 4)  # what --weights gives the others
    from bbzo.tasks.defense import load_images
    d = load_images(root / "toy.npz", 0, 0, 0)
    m, s = torch.tensor(res["config"]["mean"]).view(1, 3, 1, 1), torch.tensor(res["config"]["std"]).view(1, 3, 1, 1)
    assert clean_accuracy(lambda x: net((x - m) / s), d.test_x, d.test_y) == pytest.approx(res["results"]["test_acc"])
    r = runner.invoke(main, ["defense", "classifier", "--data", str(root / "toy.npz"), "--classifier",
                             "tests.tasks.test_defense:TinyNet", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "trains an architecture by name" in r.output


def test_the_small_presets_set_what_they_say_and_flags_override_them():
    from bbzo.config import resolve
    from bbzo.tasks.defense import CertifySettings, ClassifierSettings, PretrainSettings
    from bbzo.tasks.defense.settings import SMALL, SMALL_CLASSIFIER

    for cls, stage in ((ClassifierSettings, "classifier"), (PretrainSettings, "pretrain"),
                       (FinetuneSettings, "finetune"), (CertifySettings, "certify")):
        s, src = resolve(cls, {"preset": "small"})
        for k, v in SMALL[stage].items():
            assert getattr(s, k) == (tuple(v) if isinstance(v, tuple) else v) and src[k] == "preset small", (stage, k)
    s, src = resolve(CertifySettings, {"preset": "small", "n": 200})
    assert s.n == 200 and src["n"] != "preset small" and s.classifier == SMALL_CLASSIFIER
    assert resolve(FinetuneSettings, {})[0].classifier == "resnet50"  # paper: the defaults


def test_the_documented_quick_start_runs_as_written_with_tiny_settings(setup, tmp_path, monkeypatch):
    """docs/results/defense.md's quick start: every flag exists (a renamed flag fails here), and the four stages run
    in order on a tiny data file when tiny settings are appended (flags override the preset)."""
    import shlex
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from defense_walkthrough import quickstart_commands

    commands = quickstart_commands()
    assert [c[:3] for c in commands] == [["bbzo", "defense", s] for s in ("classifier", "pretrain", "finetune", "certify")]
    runner = CliRunner()
    for argv in commands:
        r = runner.invoke(main, [*argv[1:], "--help"])
        assert r.exit_code == 0, f"{shlex.join(argv)}: {r.output}"
    tiny = ["--no-progress", "--no-plots", "--test-subset", "8"]
    box = ["--classifier", "timm:test_resnet", "--num-classes", "4"]
    extra = {"classifier": ["--classifier", "timm:test_resnet", "--steps", "3", "--batch", "16", *tiny],
             "pretrain": ["--depth", "3", "--width", "8", "--steps", "3", "--batch", "16", *tiny],
             "finetune": [*box, "--steps", "2", "--batch", "4", "--budget", "10", "--score-q", "2", "--eval-every", "0",
                          *tiny],
             "certify": [*box, "--n0", "5", "--n", "20", *tiny]}
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        args = [str(setup / "toy.npz") if a == "$D" else a for a in argv[1:]] + extra[argv[2]]
        r = runner.invoke(main, args)
        assert r.exit_code == 0, f"{shlex.join(argv)}: {r.output}"
    cert = json.loads((tmp_path / "runs/def/cert/results.json").read_text())
    assert set(cert["certified_accuracy"]) == {"none", "mse", "zo"} and cert["images"] == 8

