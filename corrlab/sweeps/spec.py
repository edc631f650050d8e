"""Sweep specs: a TOML file (or a dict of the same shape) -> validated, expanded work items.

Why TOML: ``tomllib`` is in the standard library (3.11; ``tomli`` on 3.10), its values are typed
(``no`` stays a string, ``1e-3`` a float), and a spec is a small flat table of grids. Layout::

    [generation]                  # grid axes: a scalar is one value, a list is an axis
    models    = "corrlab-mvunet-s" # model folder or name under data/ (relative paths: from the spec file)
    prompts   = ["red striped box", "blue dotted sphere"]
    seeds     = [0, 1]
    views     = [2, 4]            # cameras drawn from the seed ...
    layouts   = "train"           # ... in these layouts (corrlab.scenes.sample_cameras: train, even, random)
    # cameras = ["a/cameras.json"]  ... or fixed cameras.json files (not both)
    num_steps = 4
    guidance  = 3.0

    [probe]                       # one probe per generation (not an axis)
    layers = ["blocks.4.attn"]    # default: every multi-image layer
    steps  = [0, 3]               # default: every step
    heads  = "mean"               # + the other MatchingOptions fields (similarity, confidence, threshold,
                                  #   window_radius, mutual, strict, history), chunk_size, batch_index

    [score]                       # not an axis
    thresholds = [1, 2, 5, 10]
    kind = "symmetric"
    kept_only = true
    controls = ["chance", "identity", "appearance"]
    baselines = []                # e.g. ["sift"]

    [[interventions]]             # optional; default one entry name = "none"
    name = "none"
    [[interventions]]
    name = "corr_adapter"         # CorrAdapterConfig.build keywords (its fields and the MatchingOptions
                                  #   fields); lists are grids
    eta = [0.1, 0.5]

Items = (product of the generation axes) x (sum over interventions of the product of their lists).
Every error names the key and what was expected, and is raised before any work starts.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorrlabError

__all__ = ["SweepSpec", "SweepItem", "load_spec", "ITEM_FORMAT_VERSION"]

#: Bumped when the meaning of an item's configuration (or what it writes) changes: part of every key.
ITEM_FORMAT_VERSION = 1

_SECTIONS = ("generation", "probe", "score", "interventions")
_GENERATION_KEYS = ("models", "prompts", "seeds", "views", "layouts", "cameras", "num_steps", "guidance")
_PROBE_KEYS = ("layers", "steps", "similarity", "heads", "confidence", "threshold", "window_radius", "mutual",
               "strict", "chunk_size", "history", "batch_index")
_SCORE_KEYS = ("thresholds", "kind", "kept_only", "controls", "baselines")
INTERVENTIONS = ("none", "corr_adapter")


class SpecError(CorrlabError):
    """A sweep spec is invalid (raised before any work starts)."""


def _err(key: str, expected: str, got: Any) -> SpecError:
    r = repr(got)
    return SpecError(f"sweep spec: {key}: expected {expected}, got {r[:120]}")


@dataclass(frozen=True)
class SweepItem:
    """One unit of work: one generation run (all probed layers and steps come out of one pass).

    ``config`` is the full, JSON-able configuration; ``key`` a hash of it (what the store is keyed by);
    ``labels`` the flat labels of the item's axes (prompt, seed, views, ..., intervention parameters).
    """

    key: str
    config: dict
    labels: dict

    @property
    def model_path(self) -> str:
        return self.config["model"]["path"]


@dataclass
class SweepSpec:
    """A validated spec: the normalised sections, where it came from, and its expanded items."""

    generation: dict
    probe: dict
    score: dict
    interventions: list
    source: str | None = None
    models: dict = field(default_factory=dict)  # label -> {"path", "sha256"}

    def to_dict(self) -> dict:
        return {"generation": self.generation, "probe": self.probe, "score": self.score,
                "interventions": self.interventions}

    @property
    def hash(self) -> str:
        return _hash(self.to_dict())

    def items(self) -> list["SweepItem"]:
        """Every item of the sweep, in a stable order (grouped by model)."""
        g = self.generation
        layouts = ([{"views": v, "layout": lay, "cameras": None} for v in g["views"] for lay in g["layouts"]]
                   if g["cameras"] is None
                   else [{"views": len(c["views"]), "layout": None, "cameras": c} for c in g["cameras"]])
        out, seen = [], set()
        for model, prompt, seed, layout, steps, guidance in itertools.product(
                g["models"], g["prompts"], g["seeds"], layouts, g["num_steps"], g["guidance"]):
            for iv in _expand_interventions(self.interventions):
                config = {
                    "format": ITEM_FORMAT_VERSION,
                    "model": {"label": model, "sha256": self.models[model]["sha256"], "path": self.models[model]["path"]},
                    "prompt": prompt, "seed": seed, "views": layout["views"], "layout": layout["layout"],
                    "cameras": copy.deepcopy(layout["cameras"]), "num_steps": steps, "guidance": guidance,
                    "probe": self.probe, "score": self.score, "intervention": iv,
                }
                key = item_key(config)
                if key in seen:
                    continue
                seen.add(key)
                labels = {"model": model, "prompt": prompt, "seed": seed, "views": layout["views"],
                          "layout": layout["layout"],
                          "cameras": None if layout["cameras"] is None else layout["cameras"]["source"],
                          "num_steps": steps, "guidance": guidance, "intervention": iv["name"]}
                labels.update({f"intervention_{k}": v for k, v in iv.items() if k != "name"})
                out.append(SweepItem(key=key, config=config, labels=labels))
        return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def item_key(config: dict) -> str:
    """Hash of an item's full configuration (the local model path excluded: the weights' hash is in it,
    so a store resumes on another machine, and new weights under the same name give new keys)."""
    c = {**config, "model": {k: v for k, v in config["model"].items() if k != "path"}}
    return _hash(c)[:24]


def _expand_interventions(interventions: list[dict]) -> list[dict]:
    out = []
    for iv in interventions:
        params = {k: v for k, v in iv.items() if k != "name"}
        names = sorted(params)
        for values in itertools.product(*(params[k] for k in names)):
            out.append({"name": iv["name"], **dict(zip(names, values))})
    return out


# ------------------------------------------------------------------------------------------ parsing
def _read_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"sweep spec: {str(path)!r} is not valid TOML ({e})") from None


def load_spec(spec: "str | os.PathLike | dict | SweepSpec", check_model: bool = True) -> SweepSpec:
    """Read and validate a spec (a ``.toml`` path, a dict of the same shape, or a ``SweepSpec``).

    Raises :class:`SpecError` naming the key and what was expected (unknown keys, empty grids, wrong
    types, missing model folders or camera files, layers the model does not have, probe steps beyond
    ``num_steps``). With ``check_model`` the models are opened (cheap for the embedded model) to check
    layer names, patch size and to hash their weights.
    """
    if isinstance(spec, SweepSpec):
        return spec
    base = Path.cwd()
    source = None
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise SpecError(f"sweep spec: expected a TOML file, got {str(spec)!r} (missing)")
        if path.suffix.lower() != ".toml":
            raise SpecError(f"sweep spec: expected a .toml file, got {str(spec)!r}")
        raw, base, source = _read_toml(path), path.resolve().parent, str(path)
    elif isinstance(spec, dict):
        raw = copy.deepcopy(spec)
    else:
        raise SpecError(f"sweep spec: expected a .toml path or a dict, got {type(spec).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise _err(unknown[0], f"one of the sections {list(_SECTIONS)}", unknown[0])
    if "generation" not in raw:
        raise SpecError(f"sweep spec: generation: expected a [generation] table with keys {list(_GENERATION_KEYS)}, got none")
    gen = _generation(_table(raw, "generation", _GENERATION_KEYS), base)
    probe = _probe(_table(raw, "probe", _PROBE_KEYS))
    score = _score(_table(raw, "score", _SCORE_KEYS))
    interventions = _interventions(raw.get("interventions", [{"name": "none"}]))
    out = SweepSpec(generation=gen, probe=probe, score=score, interventions=interventions, source=source)
    out.models = {m: _model(m, base, probe, gen, check_model) for m in gen["models"]}
    return out


def _table(raw: dict, name: str, keys: tuple) -> dict:
    t = raw.get(name, {})
    if not isinstance(t, dict):
        raise _err(name, f"a table with keys {list(keys)}", t)
    unknown = sorted(set(t) - set(keys))
    if unknown:
        raise _err(f"{name}.{unknown[0]}", f"one of {list(keys)} (unknown key)", unknown[0])
    return t


def _axis(t: dict, section: str, key: str, check, expected: str, default=None) -> list:
    full = f"{section}.{key}"
    if key not in t:
        if default is None:
            raise SpecError(f"sweep spec: {full}: expected {expected} (a value or a non-empty list), got nothing")
        return list(default)
    v = t[key]
    values = v if isinstance(v, list) else [v]
    if not values:
        raise _err(full, f"a non-empty list of {expected}", v)
    out = []
    for x in values:
        ok = check(x)
        if ok is None:
            raise _err(full, expected, x)
        if ok not in out:
            out.append(ok)
    return out


def _int(lo: int):
    return lambda x: int(x) if isinstance(x, int) and not isinstance(x, bool) and x >= lo else None


def _num(lo: float, hi: float = float("inf")):
    return lambda x: float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and lo <= x <= hi else None


def _str(x):
    return x if isinstance(x, str) and x.strip() else None


def _generation(t: dict, base: Path) -> dict:
    from ..model import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_MODEL_NAME

    g = {
        "models": _axis(t, "generation", "models", _str, "a model folder or a name under data/",
                        default=[os.environ.get("CORRLAB_MODEL") or DEFAULT_MODEL_NAME]),
        "prompts": _axis(t, "generation", "prompts", _str, "non-empty prompt strings"),
        "seeds": _axis(t, "generation", "seeds", _int(0), "ints >= 0"),
        "num_steps": _axis(t, "generation", "num_steps", _int(1), "ints >= 1 (sampling steps)", default=[DEFAULT_STEPS]),
        "guidance": _axis(t, "generation", "guidance", _num(0.0), "numbers >= 0 (guidance scale)",
                          default=[DEFAULT_GUIDANCE]),
    }
    both = [k for k in ("views", "layouts") if k in t]
    if both and "cameras" in t:
        raise SpecError(f"sweep spec: generation.{both[0]}, generation.cameras: expected one of them (view counts "
                        "and layouts, or cameras.json files), got both")
    if "cameras" in t:
        files = _axis(t, "generation", "cameras", _str, "paths of cameras.json files (or set folders)")
        g["views"], g["layouts"], g["cameras"] = None, None, [_cameras(f, base) for f in files]
    else:
        from ..scenes.cameras import LAYOUTS

        g["views"] = _axis(t, "generation", "views", _int(2), "ints >= 2 (views per generation)", default=[4])
        g["layouts"] = _axis(t, "generation", "layouts", lambda x: x if x in LAYOUTS else None,
                             f"camera layouts from {list(LAYOUTS)}", default=["train"])
        g["cameras"] = None
    return g


def _cameras(f: str, base: Path) -> dict:
    p = Path(f).expanduser()
    if not p.is_absolute():
        p = base / p
    if p.is_dir():
        p = p / "cameras.json"
    if not p.is_file():
        raise _err("generation.cameras", "an existing cameras.json file (or a set folder)", str(p))
    try:
        header = json.loads(p.read_text())
        views, w, h = header["views"], int(header["width"]), int(header["height"])
    except (ValueError, KeyError, TypeError):
        raise _err("generation.cameras", "a corrlab cameras.json (keys views, width, height)", str(p)) from None
    if w != h or not isinstance(views, list) or len(views) < 2:
        raise _err("generation.cameras", "square views and at least 2 cameras", f"{p}: {w}x{h}, {len(views)} views")
    return {"source": str(f), "size": w, "views": views}


def _probe(t: dict) -> dict:
    from ..probing.matcher import DEFAULT_CHUNK_SIZE, MatchingOptions

    try:
        options = MatchingOptions.build(**{k: t[k] for k in MatchingOptions.fields() if k in t})
    except CorrlabError as e:
        raise SpecError(f"sweep spec: probe.{e}") from None
    chunk_size = t.get("chunk_size", DEFAULT_CHUNK_SIZE)
    if _int(1)(chunk_size) is None:
        raise _err("probe.chunk_size", "a positive int (source tokens per matcher block)", chunk_size)
    layers = t.get("layers")
    if layers is not None:
        layers = _axis(t, "probe", "layers", _str, "layer names (see corrlab.probe.layers(pipe))")
    steps = t.get("steps")
    if steps is not None:
        steps = sorted(_axis(t, "probe", "steps", _int(0), "step indices >= 0"))
    b = t.get("batch_index")
    if b is not None and (isinstance(b, bool) or not isinstance(b, int)):
        raise _err("probe.batch_index", "an int", b)
    return {"layers": layers, "steps": steps, "batch_index": b, "chunk_size": chunk_size, **options.as_dict()}


def _score(t: dict) -> dict:
    from ..baselines import MATCHERS
    from ..probing.controls import CONTROLS
    from ..evaluation import DEFAULT_THRESHOLDS, DISTANCE_KINDS as KINDS

    ths = _axis(t, "score", "thresholds", _num(0.0), "pixel thresholds >= 0", default=DEFAULT_THRESHOLDS)
    kind = t.get("kind", "symmetric")
    if kind not in KINDS:
        raise _err("score.kind", f"one of {list(KINDS)}", kind)
    kept = t.get("kept_only", True)
    if not isinstance(kept, bool):
        raise _err("score.kept_only", "a bool", kept)
    out = {"thresholds": sorted(ths), "kind": kind, "kept_only": kept}
    for key, allowed, default in (("controls", CONTROLS, ["chance", "identity", "appearance"]),
                                  ("baselines", tuple(MATCHERS), [])):
        v = t.get(key, default)
        if not isinstance(v, list) or any(x not in allowed for x in v):
            raise _err(f"score.{key}", f"a list of names from {list(allowed)} (may be empty)", v)
        out[key] = list(dict.fromkeys(v))
    return out


def _interventions(v: Any) -> list[dict]:
    from ..interventions.aggregation import CorrAdapterConfig

    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not v:
        raise _err("interventions", "a non-empty list of tables with a 'name'", v)
    from ..probing.matcher import MatchingOptions

    # keyword form of CorrAdapterConfig.build: its fields (matching as the MatchingOptions fields)
    fields = ([f for f in CorrAdapterConfig.__dataclass_fields__ if f not in ("layers", "matching")]
              + list(MatchingOptions.fields()) + ["layers"])
    out = []
    for i, iv in enumerate(v):
        key = f"interventions[{i}]"
        if not isinstance(iv, dict) or iv.get("name") not in INTERVENTIONS:
            raise _err(f"{key}.name", f"one of {list(INTERVENTIONS)}", iv.get("name") if isinstance(iv, dict) else iv)
        params = {k: x for k, x in iv.items() if k != "name"}
        if iv["name"] == "none":
            if params:
                raise _err(f"{key}.{sorted(params)[0]}", "no parameters for name = 'none'", sorted(params)[0])
            out.append({"name": "none"})
            continue
        grid = {}
        for k, x in params.items():
            if k not in fields:
                raise _err(f"{key}.{k}", f"one of the corr_adapter parameters {fields} (unknown key)", k)
            if k == "layers":
                grid[k] = [x] if isinstance(x, list) and x and all(isinstance(s, str) for s in x) else None
                if grid[k] is None:
                    raise _err(f"{key}.layers", "a non-empty list of layer names", x)
                continue
            values = x if isinstance(x, list) else [x]
            if not values:
                raise _err(f"{key}.{k}", "a value or a non-empty list of values", x)
            grid[k] = list(dict.fromkeys(values))
        for combo in itertools.product(*grid.values()):  # validate every grid point now
            try:
                CorrAdapterConfig.build(**dict(zip(grid, combo)))
            except CorrlabError as e:
                raise SpecError(f"sweep spec: {key}.{e}") from None
        out.append({"name": iv["name"], **grid})
    return out


def _model(label: str, base: Path, probe: dict, gen: dict, check: bool) -> dict:
    from ..errors import WeightsNotFoundError
    from ..model import resolve_model_path

    p = Path(label).expanduser()
    candidate = p if p.is_absolute() else base / p
    try:
        path = candidate if candidate.is_dir() else resolve_model_path(label)
    except WeightsNotFoundError:
        raise _err("generation.models", "an existing model folder (model/config.json + safetensors) or a "
                   "name under data/", label) from None
    files = sorted(q for q in path.rglob("*") if q.is_file() and q.suffix in (".json", ".safetensors")
                   and q.parent.name in ("model", "scheduler", path.name))
    weights = [q for q in files if q.suffix == ".safetensors"]
    if not weights or not any(q.name == "config.json" for q in files):
        raise _err("generation.models", "a model folder holding config.json and safetensors weights", str(path))
    h = hashlib.sha256()
    for q in files:
        if q.name in ("config.json", "scheduler_config.json") or q.suffix == ".safetensors":
            h.update(q.relative_to(path).as_posix().encode())
            with open(q, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    info = {"path": str(path.resolve()), "sha256": h.hexdigest()}
    if check:
        _check_model_layers(label, path, probe, gen)
    return info


def _check_model_layers(label: str, path: Path, probe: dict, gen: dict) -> None:
    cfg_file = path / "model" / "config.json" if (path / "model").is_dir() else path / "config.json"
    from ..model import MultiViewDiT
    from ..probing.taps import list_layers

    try:
        cfg = json.loads(cfg_file.read_text())
        model = MultiViewDiT.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    except (ValueError, TypeError) as e:
        raise _err("generation.models", "a MultiViewDiT folder (corrlab's embedded model)", f"{path}: {e}") from None
    patch = int(model.config.patch_size)
    names = [info.name for info in list_layers(model)]
    for layer in probe["layers"] or []:
        if layer not in names:
            raise _err("probe.layers", f"layers of model {label!r}: {names}", layer)
    if probe["steps"]:
        too_far = [s for s in probe["steps"] if s >= min(gen["num_steps"])]
        if too_far:
            raise _err("probe.steps", f"step indices < generation.num_steps ({min(gen['num_steps'])})", too_far)
    for c in gen["cameras"] or []:
        if c["size"] % patch:
            raise _err("generation.cameras", f"an image size divisible by the patch size {patch} of {label!r}",
                       f"{c['source']}: {c['size']}")
