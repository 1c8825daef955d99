"""A1111-style prompt weights ``(object:1.3)``: the one parser shared by the Antidote rule
checks and the text-to-image stage."""
from __future__ import annotations

import re

#: ``(words:weight)``; group 1 the words, group 2 the weight
WEIGHT_RE = re.compile(r"\(\s*([^():]+?)\s*:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")


def has_weights(text: str) -> bool:
    """True if ``text`` contains at least one ``(words:weight)`` group."""
    return bool(WEIGHT_RE.search(text or ""))


def strip_weights(text: str) -> str:
    """``"a (bird house:1.3) in (snow:1.2)"`` -> ``"a bird house in snow"``."""
    return WEIGHT_RE.sub(lambda m: m.group(1), text or "")


def weighted_objects(text: str) -> list[tuple[str, float]]:
    """``(object, weight)`` pairs written as ``(object:weight)`` in ``text``, in order."""
    return [(m.group(1).strip(), float(m.group(2))) for m in WEIGHT_RE.finditer(text or "")]
