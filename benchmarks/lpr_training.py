"""Do the layer-wise ratios matter? Train ResNet-20 on real CIFAR-10 with each LPR (issue 3).

For each LPR file (``benchmarks/pruning_agreement.py --lpr-dir``) the weights of every scored layer
keep exactly the LPR's count, at positions drawn uniformly inside the layer (DeepZero uses the ratios
this way; the sampler of ``bbzo.sparsity``); the pruned weights stay zero. BN and the classifier bias
are dense. The sparse network is trained **first-order** (the ``autograd`` estimator through bbzo's
``Trainer``, SGD) as in the paper's Table A2 ("FO-trained sparse models"), which isolates the question
"how good are these ratios" from ZO noise and fits a CPU. Small scale: 10,000 training images, few epochs, so compare the rows with each other,
not with the paper's 50-epoch numbers. Prints JSON.

    .venv/bin/python benchmarks/lpr_training.py --epochs 4 --out benchmarks/results/lpr_training.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bbzo
from bbzo.models import create_model
from bbzo.provenance import provenance
from bbzo.sparsity import DynamicSparsity, LayerRatios
from bbzo.tasks.cifar import load_image_classification
from bbzo.trainer import Trainer

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "cifar10_subset.npz"


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, batched."""
    b = x.shape[0]
    xp = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (b,), generator=g)
    j = torch.randint(0, 9, (b,), generator=g)
    rows = (i[:, None] + torch.arange(32))[:, None, :, None].expand(b, 3, 32, 32)
    cols = (j[:, None] + torch.arange(32))[:, None, None, :].expand(b, 3, 32, 32)
    out = xp[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


class AugmentedEpochs:
    """Shuffled, augmented minibatches; one generator drives the permutation of each epoch and the augmentation.

    Batches must be asked for in step order (this benchmark never resumes).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.steps_per_epoch = x.shape[0] // batch
        self.g = torch.Generator().manual_seed(seed)
        self.next_step = 0
        self.perm = torch.arange(0)

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert step == self.next_step, "AugmentedEpochs serves steps in order"
        self.next_step += 1
        if step % self.steps_per_epoch == 0:
            self.perm = torch.randperm(self.x.shape[0], generator=self.g)
        s = step % self.steps_per_epoch
        idx = self.perm[s * self.batch:(s + 1) * self.batch]
        return augment(self.x[idx], self.g), self.y[idx]


def train_one(lpr: LayerRatios, xtr, ytr, xte, yte, *, epochs: int, batch: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = create_model("resnet20")
    params = dict(model.named_parameters())
    coords = DynamicSparsity(lpr, {n: p.detach() for n, p in params.items()}, seed=seed).coords(0)
    masks = {}
    for n in lpr.kept:
        m = torch.zeros(params[n].numel(), dtype=torch.bool)
        m[coords[n]] = True
        masks[n] = m.view(params[n].shape)
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    data = AugmentedEpochs(xtr, ytr, batch, seed)
    spe = data.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * spe, pct_start=0.15)
    model.train()
    trainer = Trainer(model, lambda out, t: F.cross_entropy(out, t, reduction="none"),
                      bbzo.create_estimator("autograd"), opt, data, max_steps=epochs * spe, scheduler=sched)
    losses: list[float] = []
    t0 = time.perf_counter()

    def after_step(tr, status):
        with torch.no_grad():  # the pruned weights stay zero
            for n, m in masks.items():
                params[n].mul_(m)
        losses.append(status["loss"])
        if tr.step_count % spe == 0:
            print(f"  {lpr.score:<16} epoch {tr.step_count // spe}/{epochs} train loss {sum(losses[-spe:]) / spe:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    trainer.after_step.append(after_step)
    trainer.run()
    tot = sum(losses[-spe:])
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xte[i:i + 500]).argmax(1) == yte[i:i + 500]).sum()) for i in range(0, xte.shape[0], 500))
    nz = sum(int((params[n] != 0).sum()) for n in masks)
    return {"test_acc": round(100.0 * correct / xte.shape[0], 2), "train_loss_last_epoch": round(tot / spe, 4),
            "nonzero_scored_weights": nz, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--lpr-dir", type=Path, default=ROOT / "results" / "lpr")
    ap.add_argument("--labels", default="random,layer_noise,zo_grasp,zo_grasp_oracle,fo_grasp")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (smoke runs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data.is_file():
        sys.exit(f"error: {args.data} not found; pass --data path/to/cifar10_subset.npz")
    xtr, ytr = load_image_classification(args.data, "train")
    xte, yte = load_image_classification(args.data, "test")
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    rows = {}
    for label in [s.strip() for s in args.labels.split(",") if s.strip()]:
        lpr = LayerRatios.load(args.lpr_dir / f"resnet20_{label}_{args.sparsity:g}.json")
        runs = [train_one(lpr, xtr, ytr, xte, yte, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=int(s))
                for s in args.seeds.split(",")]
        accs = [r["test_acc"] for r in runs]
        rows[label] = {"test_acc_mean": round(sum(accs) / len(accs), 2), "test_acc": accs, "runs": runs,
                       "lpr_queries": lpr.queries}
        print(f"{label:<16} test acc {accs}", file=sys.stderr, flush=True)
    result = {"benchmark": "lpr_training", "command": "python " + " ".join(sys.argv), "model": "resnet20",
              "sparsity": args.sparsity, "train_images": int(xtr.shape[0]), "test_images": int(xte.shape[0]),
              "epochs": args.epochs, "batch": args.batch, "optimizer": f"SGD nesterov lr {args.lr} one-cycle, wd 5e-4",
              "training": "first-order, static mask: LPR counts at uniformly random positions per layer",
              "paper_table_a2_90pct": {"random": 86.55, "zo_grasp": 88.08, "fo_grasp": 88.55},
              "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M"), "provenance": provenance()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
