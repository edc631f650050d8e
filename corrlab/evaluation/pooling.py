"""The one pooling of score rows: ``precision = sum n_correct / sum n_matches`` per group.

Pooling weights every match equally (a pair with many matches counts more than a pair with few), so
a pooled precision is the fraction of all matches in the group that are correct; NaN when the group
has no match. Plots, dashboards, the CLI and the headline comparison all pool here.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from ..errors import CorrlabError

__all__ = ["pool_scores"]


def pool_scores(df: pd.DataFrame, by: Sequence[str] = ("method", "layer", "step", "threshold")) -> pd.DataFrame:
    """Pool per-pair score rows into one row per group of ``by``.

    Args:
        df: a score table (at least ``by``, ``n_correct`` and ``n_matches``).
        by: group columns (groups keep their order of first appearance; missing values form groups).

    Returns:
        The ``by`` columns, then ``precision`` (pooled, NaN without matches), ``n_correct``, ``n_matches``
        (sums), ``n_pairs`` (rows pooled) and, when ``df`` has a ``kind`` column not in ``by``, ``kind``.
        ``layer``/``step`` hold ``None`` (not NaN) where missing.

    Raises:
        CorrlabError: a missing column, or a table mixing distance kinds that ``by`` would pool.
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = sorted({"n_correct", "n_matches", *by} - set(df.columns))
    if missing:
        raise CorrlabError(f"df: expected columns {by + ['n_correct', 'n_matches']}, missing {missing}")
    pool_kind = "kind" in df.columns and "kind" not in by
    if pool_kind and df["kind"].nunique() > 1:
        raise CorrlabError(f"by: the table mixes distance kinds {sorted(df['kind'].unique())}; add 'kind' to by={by}")
    out = df.groupby(by, dropna=False, sort=False).agg(
        n_correct=("n_correct", "sum"), n_matches=("n_matches", "sum"), n_pairs=("n_matches", "size")
    ).reset_index()
    out.insert(len(by), "precision", out["n_correct"] / out["n_matches"].where(out["n_matches"] > 0))
    out = out.astype({c: object for c in ("layer", "step") if c in out.columns})
    for c in ("layer", "step"):
        if c in out.columns:
            out[c] = out[c].where(out[c].notna(), None)
    if pool_kind and len(df):
        out["kind"] = df["kind"].iloc[0]
    return out
