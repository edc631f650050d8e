"""Jupyter dashboards (ipywidgets 8 + matplotlib only): thin layers over :mod:`corrlab.plotting`.

* :class:`CorrespondenceExplorer`: a probed generation, token by token, with heat maps, epipolar lines,
  kept / rejected matches, SIFT matches on the same pair and a joint PCA view of the layer's keys (q and
  k from :func:`corrlab.probing.cache_attention`, read off the taps).
* :class:`AccuracyDashboard`: layer x step precision heat map and curves vs threshold with baselines.
* :class:`InterventionPanel`: CorrAdapter and segment-transport toggles with a Run button.

Each dashboard is displayed by evaluating it in a cell (``widget`` holds the ipywidgets tree); its
figures are ``ipywidgets.Image`` widgets holding PNG bytes. Invalid selections show a message.
"""
from .accuracy import AccuracyDashboard
from .explorer import CorrespondenceExplorer, check_record
from .intervention import InterventionPanel, count_model_calls, epipolar_consistency, pair_alignment

__all__ = [
    "AccuracyDashboard",
    "CorrespondenceExplorer",
    "InterventionPanel",
    "check_record",
    "count_model_calls",
    "epipolar_consistency",
    "pair_alignment",
]
