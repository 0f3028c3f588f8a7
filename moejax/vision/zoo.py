"""Networks by name (``moejax vision plan --model``): the builders of :mod:`moejax.vision.spec` and the
receptive-field-redistributed variants of :mod:`moejax.vision.redistribute`.

This sits above both, so that :mod:`~moejax.vision.spec` needs nothing from
:mod:`~moejax.vision.redistribute` (which builds on it).
"""

from __future__ import annotations

from moejax.vision.redistribute import redistribute_mobilenetv2
from moejax.vision.spec import NetSpec, mobilenetv2

# name -> builder(width, resolution, num_classes)
MODELS = {"mobilenetv2": mobilenetv2, "mobilenetv2-rd": redistribute_mobilenetv2}


def get_model_spec(name: str, width: float = 1.0, resolution: int = 224, num_classes: int = 1000) -> NetSpec:
    """Spec by name: ``mobilenetv2``, ``mobilenetv2-rd`` (redistributed: :data:`moejax.vision.redistribute.MBV2_RD`)."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model={name!r} is invalid: allowed values are {', '.join(map(repr, MODELS))}")
    return MODELS[name](width, resolution, num_classes)
