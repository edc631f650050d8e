"""SIFT + brute-force L2 matching with Lowe's ratio test (OpenCV).

OpenCV keypoints (``cv2.KeyPoint.pt``) put the centre of the top-left pixel at (0, 0) with x = column,
which is corrlab's convention, so coordinates are used unchanged (checked by an integer-shift test).
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from corrlab.errors import ValueRangeError

from .images import as_image_tensor, to_gray_uint8
from .matches import Matches

__all__ = ["match_sift", "ratio_test_matches"]


def _detect(gray: np.ndarray, max_features: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Detect SIFT keypoints: pixels ``(K, 2)`` float64 and descriptors ``(K, 128)`` float32 (None if K = 0)."""
    sift = cv2.SIFT_create(nfeatures=0 if max_features is None else int(max_features))
    keypoints, descriptors = sift.detectAndCompute(gray, None)
    pts = np.array([kp.pt for kp in keypoints], dtype=np.float64).reshape(-1, 2)
    return pts, descriptors


def ratio_test_matches(desc_query: np.ndarray, desc_train: np.ndarray, ratio: float) -> dict[int, tuple[int, float]]:
    """Nearest neighbours of each query descriptor that pass Lowe's ratio test.

    Args:
        desc_query: ``(K0, D)`` float32 descriptors.
        desc_train: ``(K1, D)`` float32 descriptors.
        ratio: keep a match when ``d_best < ratio * d_second`` (a query with one candidate always passes).

    Returns:
        ``{query_index: (train_index, margin)}`` with ``margin = 1 - d_best / d_second`` in [0, 1]
        (1 when there is no second neighbour).
    """
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    kept: dict[int, tuple[int, float]] = {}
    for candidates in matcher.knnMatch(desc_query, desc_train, k=2):
        if not candidates:
            continue
        best = candidates[0]
        if len(candidates) == 1:
            kept[best.queryIdx] = (best.trainIdx, 1.0)
            continue
        second = candidates[1]
        if best.distance < ratio * second.distance:
            margin = 1.0 - best.distance / second.distance if second.distance > 0 else 0.0
            kept[best.queryIdx] = (best.trainIdx, float(margin))
    return kept


def match_sift(img0: Any, img1: Any, ratio: float = 0.8, mutual: bool = False,
               max_features: int | None = None) -> Matches:
    """Match two images with SIFT, ``BFMatcher(NORM_L2).knnMatch(k=2)`` and Lowe's ratio test.

    Args:
        img0, img1: ``(3, H, W)`` float tensors in [0, 1] or ``(H, W, 3)`` uint8 arrays.
        ratio: Lowe ratio in (0, 1]; 1 keeps every nearest neighbour.
        mutual: also require the match to be the ratio-test nearest neighbour from image 1 to image 0
            (then ``match_sift(a, b)`` and ``match_sift(b, a)`` give the same pairs).
        max_features: keep at most this many SIFT keypoints per image (None = all).

    Returns:
        :class:`Matches` (method ``"sift"``), sorted by keypoint index in image 0; scores are the ratio-test
        margin ``1 - d1/d2`` (with ``mutual``, the smaller of the two directions' margins).
    """
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueRangeError(f"ratio: expected a float in (0, 1], got {ratio!r}")
    if max_features is not None and int(max_features) < 1:
        raise ValueRangeError(f"max_features: expected None or a positive int, got {max_features!r}")
    gray0 = to_gray_uint8(as_image_tensor("img0", img0))
    gray1 = to_gray_uint8(as_image_tensor("img1", img1))
    pts0, desc0 = _detect(gray0, max_features)
    pts1, desc1 = _detect(gray1, max_features)
    if desc0 is None or desc1 is None or len(pts0) == 0 or len(pts1) == 0:
        return Matches.empty("sift")
    forward = ratio_test_matches(desc0, desc1, ratio)
    if mutual:
        backward = ratio_test_matches(desc1, desc0, ratio)
        pairs = [(i, j, min(m, backward[j][1])) for i, (j, m) in forward.items()
                 if j in backward and backward[j][0] == i]
    else:
        pairs = [(i, j, m) for i, (j, m) in forward.items()]
    if not pairs:
        return Matches.empty("sift")
    pairs.sort()
    idx0 = np.array([p[0] for p in pairs])
    idx1 = np.array([p[1] for p in pairs])
    scores = np.array([p[2] for p in pairs], dtype=np.float64)
    return Matches(pts0[idx0], pts1[idx1], scores, "sift")
