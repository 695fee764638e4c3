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

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from bbzo.errors import ConfigError
from bbzo.oracle import Oracle

__all__ = ["ClassifierOracle", "build_classifier", "load_weights", "load_classifier", "load_model_file", "is_model_file",
           "is_reference", "error_text", "log_probs", "IMAGENET_MEAN", "IMAGENET_STD"]

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
        raise ConfigError(f"cannot read classifier weights {path} ({type(e).__name__}: {error_text(e)}). It must be a "
                          "state dict written by torch.save(model.state_dict()) or safetensors; re-export it.") from e
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}  # DataParallel prefix


def error_text(e: BaseException) -> str:
    """An exception's message, whole, except torch's advice to load unsafely (never shown: bbzo loads weights only)."""
    text = str(e).strip()
    if "WeightsUnpickler error" in text:  # torch.load(weights_only=True) refused what it read
        rest = text.split("WeightsUnpickler error", 1)[1].lstrip(":")
        detail = next((line.strip() for line in rest.splitlines() if line.strip()), "")
        if detail.startswith("Unsupported global"):
            return f"it holds Python objects, not only tensors: {detail}"
        return f"not a file written by torch.save: {detail}"
    if "weights_only" in text:
        return text.splitlines()[0]
    return text or type(e).__name__


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


def _from_reference(ref: str) -> Any:
    """``module:attr`` or ``file.py:attr`` (:func:`bbzo.references.load_object`): a module, a class, or a function."""
    from bbzo.references import load_object

    obj = load_object(ref)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        try:
            obj = obj()
        except Exception as e:  # noqa: BLE001 - the user's constructor
            raise ConfigError(f"--classifier {ref}: {obj.__name__}() raised {type(e).__name__}: {e}. A class is built "
                              "with no arguments; name a function that builds it instead.") from e
    if not callable(obj):
        raise ConfigError(f"--classifier {ref} is a {type(obj).__name__}, not a module or a function.")
    return obj


def is_model_file(spec: str) -> bool:
    """Whether ``spec`` names a model file (TorchScript or ``torch.export``) rather than an architecture or reference."""
    path = Path(spec)
    return path.suffix in (*SCRIPT_SUFFIXES, ".pt2") or (path.suffix in (".pt", ".pth") and not is_reference(spec))


def is_reference(spec: str) -> bool:
    from bbzo.references import is_reference as _is_ref
    return not spec.startswith("timm:") and _is_ref(spec) and not Path(spec).is_file()


def load_model_file(path: Path, what: str = "classifier") -> Any:
    """A TorchScript (``torch.jit.save``) or ``torch.export`` (``.pt2``) file, on the CPU."""
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist.")
    if path.suffix == ".pt2":  # a torch.export ExportedProgram (the successor of TorchScript)
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path} is not a torch.export file ({type(e).__name__}: {error_text(e)}); save one "
                              "with torch.export.save(torch.export.export(model, (example,)), path).") from e
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        hint = (" It looks like a state dict: name the architecture and pass the file as --weights"
                if what == "classifier" else "")
        raise ConfigError(f"{path} is not a TorchScript file ({type(e).__name__}: {error_text(e)}); save one with "
                          f"torch.jit.save(torch.jit.script(model), path).{hint}") from e


def load_classifier(spec: str, weights: Optional[Union[str, Path]] = None, num_classes: int = 10) -> Callable:
    """The classifier ``spec`` names (see the module docstring), in eval mode with frozen parameters.

    Raises:
        ConfigError: a missing or unreadable file, an unknown architecture, a reference that does not import,
            weights that do not fit, or ``weights`` given with a TorchScript / ``torch.export`` file (which
            holds its own weights).
    """
    spec = str(spec)
    if is_model_file(spec):
        if weights is not None:
            raise ConfigError(f"--classifier {spec} is a TorchScript / torch.export file, which holds its own weights; "
                              f"drop --weights {weights}, or name the architecture (resnet50, timm:NAME, module:attr) "
                              "to load a state dict into.")
        net: Any = load_model_file(Path(spec))
    elif is_reference(spec):
        net = _from_reference(spec)
        if weights is not None and not isinstance(net, nn.Module):
            raise ConfigError(f"--classifier {spec} is a function, which has no state dict for --weights {weights}; "
                              "name an nn.Module (instance or class) instead, or drop --weights.")
    else:
        if "/" in spec or Path(spec).exists():
            raise ConfigError(f"--classifier {spec}: not a model file (TorchScript .pt/.ts/.jit, torch.export .pt2), "
                              "an architecture (resnet50, timm:NAME) or a reference (module:attr, file.py:attr).")
        net = build_classifier(spec, num_classes)
        if weights is None:
            raise ConfigError(f"--classifier {spec} is an architecture: give its trained weights with --weights FILE.")
    if weights is not None:
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
        classes: A class map: answer ``K = len(classes)`` classes, class ``c`` being the classifier's outputs
            ``classes[c]`` (a list of indices). Its logit is their ``logsumexp`` -- the log of their summed
            probability, up to a constant shared by all classes -- so a single index keeps its logit, and the
            answer is the classifier restricted to these classes (as ImageNet-A / -R evaluate a 1000-class
            model on a subset). ``None``: every output, as the classifier answers.
    """

    def __init__(self, net: Callable[[torch.Tensor], torch.Tensor], *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, output: str = "logits", max_batch: Optional[int] = 512,
                 classes: Optional[Sequence[Sequence[int]]] = None, **kw: Any) -> None:
        if output not in ("logits", "probs"):
            raise ConfigError(f"output must be 'logits' or 'probs', got {output!r}.")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}.")
        if classes is not None and (len(classes) < 2 or any(len(g) < 1 for g in classes)):
            raise ConfigError("a class map needs at least 2 classes, each with at least one classifier output.")
        kw.setdefault("name", "classifier")
        super().__init__(max_batch=max_batch, **kw)
        self.net, self.output = net, output
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.classes = [list(map(int, g)) for g in classes] if classes is not None else None
        self._single = self.classes is not None and all(len(g) == 1 for g in self.classes)

    def to(self, device: Any) -> "ClassifierOracle":
        if isinstance(self.net, nn.Module):
            self.net.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def map_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, K_classifier)`` logits -> ``(N, K)`` logits of the class map (unchanged without one)."""
        if self.classes is None:
            return logits
        if self._single:
            return logits[:, [g[0] for g in self.classes]]
        return torch.stack([torch.logsumexp(logits[:, g], dim=1) for g in self.classes], dim=1)

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 4 or inputs.shape[1] != self.mean.shape[1]:
            raise ConfigError(f"{self.name} takes images (N, {self.mean.shape[1]}, H, W), got {tuple(inputs.shape)}.")
        x = (inputs.float() - self.mean.to(inputs.device)) / self.std.to(inputs.device)
        logits = self.map_logits(self.net(x).float())
        return torch.softmax(logits, dim=1) if self.output == "probs" else logits
