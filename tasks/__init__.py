"""Applications built on the bbzo engine (installed as ``bbzo.tasks``); each registers a :class:`bbzo.task.Task`.

* ``projectile`` -- a launch policy through a numpy projectile simulator (``bbzo demo``);
* ``train`` -- your model through your simulator (``bbzo train``);
* ``sol`` -- ZO-SOL, a PDE corrector through the PhiFlow solver (``bbzo sol``);
* ``cifar`` -- CIFAR-10 from scratch with DeepZero and its baselines (``bbzo cifar``);
* ``defense-classifier`` / ``defense-pretrain`` / ``defense`` / ``defense-certify`` -- the certified black-box
  defense (``bbzo defense``).

A task's module is imported when the task is first asked for (:func:`bbzo.task.get_task`), not here: listing
the tasks (``bbzo run``) reads this table and imports none of them, so the command line starts without
torchvision, scipy or PhiFlow. ``tests/tasks/test_registry.py`` checks the table against the tasks.
"""

# task name (or former name) -> (the module that registers it, its one-line description)
SHIPPED: dict[str, tuple[str, str]] = {
    "projectile": ("bbzo.tasks.projectile", "train a launch policy through a black-box numpy projectile simulator"),
    "train": ("bbzo.tasks.custom", "train your model through your simulator (a Python oracle or any program)"),
    "custom": ("bbzo.tasks.custom", "train your model through your simulator (a Python oracle or any program)"),
    "sol": ("bbzo.tasks.sol", "ZO-SOL: a PDE corrector trained through the non-differentiable PhiFlow solver"),
    "cifar": ("bbzo.tasks.cifar",
              "CIFAR-10 from scratch: DeepZero (Sparse-CGE, ZO-GraSP) with FO / RGE / CGE baselines"),
    "defense-classifier": ("bbzo.tasks.defense",
                           "denoised smoothing, stage 0: train the classifier that plays the black box (first-order)"),
    "defense-pretrain": ("bbzo.tasks.defense",
                         "denoised smoothing, stage 1: pretrain a denoiser on MSE(D(x + delta), x) (first-order)"),
    "defense": ("bbzo.tasks.defense",
                "denoised smoothing, stage 2: fine-tune the denoiser through the query-only classifier"),
    "defense-certify": ("bbzo.tasks.defense",
                        "Cohen et al.'s CERTIFY of the smoothed classifier f(D(x + delta)) for each denoiser"),
}
ALIASES = ("custom",)  # former names: found by get_task, not listed
