"""Applications built on the bbzo engine (installed as ``bbzo.tasks``); each registers a :class:`bbzo.task.Task`.

* ``projectile`` -- a launch policy through a numpy projectile simulator (``bbzo demo``);
* ``custom`` -- your model through your simulator (``bbzo train``);
* ``sol`` -- ZO-SOL, a PDE corrector through the PhiFlow solver (``bbzo sol``);
* ``cifar`` -- CIFAR-10 from scratch with DeepZero and its baselines (``bbzo cifar``);
* ``defense`` -- the certified black-box defense (``bbzo defense``).
"""

from . import cifar, custom, defense, projectile, sol  # noqa: F401  (registration)
