"""A black-box image classifier as a query-only oracle (the defense's ``f``; DeepZero §6.2).

Three ways to name the classifier (``--classifier``):

* an architecture: ``resnet50`` (any ``torchvision.models`` name) or ``timm:resnet50`` (any timm name),
  built with ``num_classes`` outputs and **no** pretrained download; its weights come from the user's
  ``--weights`` file (``.safetensors``, or a ``torch.save`` state dict read with ``weights_only=True``).
  We build torchvision's ResNet-50 by default: it is the reference architecture of Cohen et al. and
  Salman et al.; timm's ``resnet50`` has identical state-dict keys and shapes, so a checkpoint written by
  either loads into both (tested);
* a TorchScript file (``.ts`` / ``.jit`` / ``.pt`` saved with ``torch.jit.save``) or a ``torch.export`` file
  (``.pt2``, ``torch.export.save``);
* an importable ``module:attr`` -- an ``nn.Module`` instance, an ``nn.Module`` class (built with no
  arguments), or a batched function ``(N, 3, H, W) in [0, 1] -> logits``.

The oracle takes images in ``[0, 1]`` pixels (noise and radii live there), applies the classifier's own
``mean``/``std`` normalization, and answers logits (or probabilities with ``output="probs"``), batched
by ``max_batch``, under ``no_grad``, counted by the ledger. Nothing else about it is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from bbzo.errors import ConfigError
from bbzo.oracle import Oracle

__all__ = ["ClassifierOracle", "build_classifier", "load_weights", "load_classifier", "log_probs",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCRIPT_SUFFIXES = (".ts", ".jit", ".torchscript")


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """An untrained classifier: ``timm:NAME`` (timm) or a ``torchvision.models`` name; ``num_classes`` outputs."""
    if arch.startswith("timm:"):
        import timm
        name = arch[5:]
        if not timm.is_model(name):
            raise ConfigError(f"timm has no model {name!r}; `python -c \"import timm; print(timm.list_models('resnet*'))\"` "
                              "lists them.")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    import torchvision
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise ConfigError(f"torchvision has no model {arch!r} ({e}); name a torchvision model (resnet50), "
                          "timm:NAME, a TorchScript file or module:attr.") from e


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"classifier weights {path} do not exist; pass --weights FILE (a state dict saved with "
                          "torch.save or a .safetensors file). bbzo never downloads weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt, truncated or foreign file
        raise ConfigError(f"cannot read classifier weights {path} ({type(e).__name__}: {str(e)[:200]}). It must be a "
                          "state dict written by torch.save(model.state_dict()) or safetensors; re-export it.") from e
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}  # DataParallel prefix


def load_weights(module: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load ``path`` into ``module`` strictly; a wrong architecture or class count gets a clear error."""
    path = Path(path)
    state = _read_state(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        own = module.state_dict()
        missing = [k for k in own if k not in state][:3]
        extra = [k for k in state if k not in own][:3]
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape][:2]
        raise ConfigError(f"{path} does not fit the classifier {type(module).__name__}: missing {missing}, unexpected "
                          f"{extra}, shape mismatches {shapes}. Check --classifier and --num-classes.") from e
    return module


def _import_attr(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError(f"cannot import {mod!r} for --classifier {ref} ({e}); is it on PYTHONPATH?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {mod!r} has no attribute {attr!r} (--classifier {ref}).")
        obj = getattr(obj, part)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        obj = obj()
    if not callable(obj):
        raise ConfigError(f"--classifier {ref} is a {type(obj).__name__}, not a module or a function.")
    return obj


def load_classifier(spec: str, weights: Optional[Union[str, Path]] = None, num_classes: int = 10) -> Callable:
    """The classifier ``spec`` names (see the module docstring), in eval mode with frozen parameters."""
    path = Path(spec)
    if path.suffix in SCRIPT_SUFFIXES or (path.suffix == ".pt" and path.is_file() and weights is None):
        if not path.is_file():
            raise ConfigError(f"TorchScript classifier {path} does not exist.")
        try:
            net: Any = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path} is not a TorchScript file ({type(e).__name__}: {str(e)[:200]}); save one with "
                              "torch.jit.save(torch.jit.script(model), path), or name an architecture and --weights.") from e
    elif path.suffix == ".pt2":  # a torch.export ExportedProgram (the successor of TorchScript)
        if not path.is_file():
            raise ConfigError(f"exported classifier {path} does not exist.")
        try:
            net = torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path} is not a torch.export file ({type(e).__name__}: {str(e)[:200]}).") from e
    elif ":" in spec and not spec.startswith("timm:"):
        net = _import_attr(spec)
    else:
        net = build_classifier(spec, num_classes)
        if weights is None:
            raise ConfigError(f"--classifier {spec} is an architecture: give its trained weights with --weights FILE.")
    if weights is not None and isinstance(net, nn.Module) and not isinstance(net, torch.jit.ScriptModule):
        load_weights(net, weights)
    if isinstance(net, nn.Module):
        if not isinstance(net, torch.fx.GraphModule):  # an exported program has no eval(); it is traced in eval mode
            net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
    return net


def log_probs(answers: torch.Tensor, output: str) -> torch.Tensor:
    """Log-probabilities ``(N, K)`` from an oracle's answers (logits, or probabilities clamped away from 0)."""
    if output == "probs":
        return torch.log(answers.clamp_min(1e-12))
    return F.log_softmax(answers, dim=1)


class ClassifierOracle(Oracle):
    """Query-only classifier: images ``(N, C, H, W)`` in ``[0, 1]`` -> logits or probabilities ``(N, K)``.

    Args:
        net: The classifier (module or batched function on *normalized* images).
        mean, std: Its input normalization (per channel), applied inside the black box.
        output: ``"logits"`` or ``"probs"`` (softmax of the logits).
        max_batch: Rows per call of the classifier (memory bound).
    """

    def __init__(self, net: Callable[[torch.Tensor], torch.Tensor], *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, output: str = "logits", max_batch: Optional[int] = 512,
                 **kw: Any) -> None:
        if output not in ("logits", "probs"):
            raise ConfigError(f"output must be 'logits' or 'probs', got {output!r}.")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}.")
        kw.setdefault("name", "classifier")
        super().__init__(max_batch=max_batch, **kw)
        self.net, self.output = net, output
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to(self, device: Any) -> "ClassifierOracle":
        if isinstance(self.net, nn.Module):
            self.net.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 4 or inputs.shape[1] != self.mean.shape[1]:
            raise ConfigError(f"{self.name} takes images (N, {self.mean.shape[1]}, H, W), got {tuple(inputs.shape)}.")
        x = (inputs.float() - self.mean.to(inputs.device)) / self.std.to(inputs.device)
        logits = self.net(x).float()
        return torch.softmax(logits, dim=1) if self.output == "probs" else logits
