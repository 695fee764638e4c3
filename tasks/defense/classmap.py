"""Which classifier outputs answer which class of the data: ``--class-map``, and the check made before anything runs.

A classifier trained on the data's own classes needs no map: its output count must equal the data's class
count (checked by one query before any image is read; a 1000-class ImageNet model on a 10-class set is
refused instead of scoring 0%). A classifier with other outputs -- an ImageNet-1k model on a 10-class
subset -- gets a map, and the black box then answers the data's classes (the classifier restricted to the
mapped outputs, :class:`bbzo.oracles.classifier.ClassifierOracle` ``classes``).

``--class-map`` is

* ``imagenette`` -- the built-in map of the ten Imagenette classes (fast.ai; the ten ImageNet classes of
  ../shared/data/imagenette_32px.npz) to their ImageNet-1k indices, keyed by WordNet id (checked against
  timm's ``imagenet_synsets.txt`` in the tests);
* a YAML / JSON file: a mapping ``data class -> classifier index`` (or a list of indices, whose summed
  probability is the class's: a superclass of several ImageNet classes), the data class named as in the
  data (an ImageFolder's folder name, an ``.npz``'s ``wnids`` or ``class_names``) or by its label; or a
  list, one entry per data label.

DeepZero's "ImageNet-10" is ZO-AE-DS's ten WordNet superclasses (dog, feline, frog, turtle, bovid, bear,
monkey, crab, insect, shark; ZO-AE-DS, Zhang et al. ICLR 2022), which the authors classify with their own
10-output ResNet-50: a 10-class classifier needs no map. To certify it with an ImageNet-1k model, write
the superclass -> leaf-index lists as a map file (bbzo does not ship the WordNet hierarchy to derive them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from bbzo.errors import ConfigError

__all__ = ["IMAGENETTE_TO_IMAGENET1K", "BUILTIN_MAPS", "read_class_map", "resolve_class_map", "check_classes"]

#: Imagenette (WordNet id) -> ImageNet-1k index (the sorted-synset order every ImageNet-1k model uses)
IMAGENETTE_TO_IMAGENET1K = {
    "n01440764": 0,    # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888257": 701,  # parachute
}
IMAGENETTE_NAMES = ("tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                    "garbage truck", "gas pump", "golf ball", "parachute")
BUILTIN_MAPS = {"imagenette": {**IMAGENETTE_TO_IMAGENET1K,
                               **dict(zip(IMAGENETTE_NAMES, IMAGENETTE_TO_IMAGENET1K.values()))}}


def read_class_map(spec: str) -> Any:
    """The raw map a ``--class-map`` value names: a built-in name, or a YAML / JSON file's mapping or list."""
    if spec in BUILTIN_MAPS:
        return dict(BUILTIN_MAPS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--class-map {spec}: neither a built-in map ({', '.join(BUILTIN_MAPS)}) nor a file. A map "
                          "file is YAML/JSON: {data class: classifier index (or [indices])}, or a list per label.")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--class-map {path} is not YAML/JSON ({type(e).__name__}: {e}).") from e
    if not isinstance(raw, (dict, list)):
        raise ConfigError(f"--class-map {path} holds a {type(raw).__name__}; it needs a mapping "
                          "{data class: classifier index} or a list with one index (or list) per data label.")
    return raw


def _indices(value: Any, where: str) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = [int(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a classifier index or a list of them.") from None
    if not out or any(v < 0 for v in out) or any(isinstance(v, bool) for v in items):
        raise ConfigError(f"{where}: {value!r} needs one or more classifier indices >= 0.")
    return out


def resolve_class_map(spec: str, classes: Sequence[str], names: Sequence[str] = ()) -> list[list[int]]:
    """Classifier output indices for each data label ``(K_data lists)``, from a ``--class-map`` value.

    Args:
        classes: The data's class identifiers in label order (folder names, wnids, or "0", "1", ...).
        names: Display names in label order (matched too).
    Raises:
        ConfigError: a data class the map does not cover (naming it), or an entry of no data class.
    """
    raw = read_class_map(spec)
    where = f"--class-map {spec}"
    if isinstance(raw, list):
        if len(raw) != len(classes):
            raise ConfigError(f"{where} lists {len(raw)} entries but the data has {len(classes)} classes.")
        return [_indices(v, f"{where} entry {i}") for i, v in enumerate(raw)]
    table = {str(k): v for k, v in raw.items()}
    out = []
    for label, cls in enumerate(classes):
        keys = [cls, *(names[label:label + 1] if len(names) == len(classes) else []), str(label)]
        hit = next((k for k in keys if k in table), None)
        if hit is None:
            raise ConfigError(f"{where} has no entry for the data's class {cls!r} (label {label}); the data's classes "
                              f"are {', '.join(list(classes)[:12])}{' ...' if len(classes) > 12 else ''}.")
        out.append(_indices(table[hit], f"{where} entry {hit!r}"))
    if spec not in BUILTIN_MAPS:
        known = {str(c) for c in classes} | {str(n) for n in names} | {str(i) for i in range(len(classes))}
        extra = [k for k in table if k not in known]
        if extra:
            raise ConfigError(f"{where} names classes the data does not have: {', '.join(extra[:5])}.")
    return out


def check_classes(outputs: int, num_data_classes: int, class_map: Optional[list[list[int]]], *, classifier: str,
                  data: str) -> None:
    """Refuse a classifier whose outputs do not answer the data's classes (one line that says what to do)."""
    if class_map is None:
        if outputs != num_data_classes:
            raise ConfigError(
                f"the classifier {classifier} answers {outputs} classes but {data} has {num_data_classes}: every "
                f"certificate would be wrong. Pass --class-map (imagenette, or a file mapping each data class to "
                f"classifier outputs) to use a {outputs}-class model on these classes, or a classifier trained on "
                "them (--num-classes for an architecture built by name).")
        return
    top = max(max(g) for g in class_map)
    if top >= outputs:
        raise ConfigError(f"--class-map uses classifier output {top}, but the classifier {classifier} answers only "
                          f"{outputs} classes.")
