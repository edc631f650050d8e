"""LoRA on the embedded model's multi-view attention (peft, as diffusers does), tied to the base weights.

CorrAdapter* (the paper's optional training scheme) fine-tunes the multi-view attention
(``blocks.*.attn`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) with a LoRA, then runs CorrAdapter on top.
A LoRA only makes sense on the exact weights it was trained on, so an adapter file records the base's
fingerprint (:func:`base_fingerprint`: SHA-256 of its weights) and step, and loading it onto another base
raises a :class:`~corrlab.errors.CorrlabError` naming both.

>>> from corrlab.model import load_default, load_corrstar
>>> pipe = load_default("corrlab-mvunet-s")                                     # doctest: +SKIP
>>> lora = load_corrstar(pipe)            # data/corrlab-mvunet-s-corrstar onto the base, in place   # doctest: +SKIP
>>> mvs = pipe(prompt, cameras=cams, reference={0: image}, seed=0)               # doctest: +SKIP
>>> lora.unload()                         # the base exactly as before (bit-identical outputs)  # doctest: +SKIP

Also a context manager: ``with load_lora(pipe, path): ...`` unloads on exit, also on exceptions.

File format: one safetensors file (``adapter_model.safetensors``) with the LoRA tensors (keys are the
module names of the injected model, e.g. ``blocks.4.attn.to_q.lora_A.weight``) and string metadata
``corrlab_lora`` (JSON: rank, alpha, target_modules, base_sha256, base_step, base_class, training facts).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CorrlabError, FormatError, WeightsNotFoundError, describe

__all__ = [
    "ATTENTION_TARGETS",
    "LoraHandle",
    "add_lora",
    "remove_lora",
    "has_lora",
    "lora_state_dict",
    "base_fingerprint",
    "save_lora",
    "read_lora_metadata",
    "load_lora",
    "load_corrstar",
    "DEFAULT_CORRSTAR",
    "ADAPTER_FILE",
]

#: Modules the LoRA wraps: the multi-view attention's projections (regex, peft ``target_modules``).
ATTENTION_TARGETS = r".*blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
#: The shipped CorrAdapter* LoRA (folder under ``data/``).
DEFAULT_CORRSTAR = "corrlab-mvunet-s-corrstar"
#: The adapter file inside a LoRA folder.
ADAPTER_FILE = "adapter_model.safetensors"
_ADAPTER = "corrstar"


def _denoiser(model_or_pipeline: Any) -> torch.nn.Module:
    model = getattr(model_or_pipeline, "model", model_or_pipeline)
    from .dit import MultiViewDiT
    from .unet import MultiViewUNet

    if not isinstance(model, (MultiViewDiT, MultiViewUNet)):
        raise CorrlabError(f"model_or_pipeline: expected a corrlab MultiViewUNet/MultiViewDiT or its pipeline, got {describe(model_or_pipeline)}")
    return model


def has_lora(model: torch.nn.Module) -> bool:
    """Whether peft LoRA layers are injected in ``model``."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def base_fingerprint(model_or_pipeline: Any) -> str:
    """SHA-256 (hex) of the base weights: every state-dict tensor (name, dtype, shape, bytes) in name order.

    Raises when a LoRA is injected (the fingerprint is of the base alone).
    """
    model = _denoiser(model_or_pipeline)
    if has_lora(model):
        raise CorrlabError("model_or_pipeline: a LoRA is loaded; unload it first (the fingerprint is of the base weights)")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def add_lora(model: torch.nn.Module, rank: int = 16, alpha: float | None = None,
             target_modules: str = ATTENTION_TARGETS, init: bool = True) -> dict:
    """Inject a peft LoRA (``rank``, ``alpha`` (default = rank), ``target_modules``) into ``model`` in place.

    Base parameters are frozen (their ``requires_grad`` flags are returned, for :func:`remove_lora`); the LoRA
    parameters are trainable. ``init=True``: peft's default init (B = 0: the model computes what the base did).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CorrlabError(f"rank: expected a positive int, got {rank!r}")
    if has_lora(model):
        raise CorrlabError("model: a LoRA is already loaded; unload it first")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), target_modules=target_modules,
                        lora_dropout=0.0, bias="none", init_lora_weights=bool(init))
    inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    if not has_lora(model):
        raise CorrlabError(f"target_modules: {target_modules!r} matched no module of {type(model).__name__}")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return flags


def remove_lora(model: torch.nn.Module, requires_grad: dict | None = None) -> None:
    """Remove every peft LoRA layer from ``model``: each wrapped module is put back (the same object, weights
    untouched), so the model computes exactly what it did before. ``requires_grad``: flags to restore."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, m in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if requires_grad:
        for n, p in model.named_parameters():
            if n in requires_grad:
                p.requires_grad_(requires_grad[n])


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model`` (names without peft's adapter name), detached CPU copies."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            out[n.replace(f".{_ADAPTER}.", ".")] = p.detach().cpu().contiguous().clone()
    return out


def _load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    params = {n.replace(f".{_ADAPTER}.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise FormatError(f"path: {path!r} does not fit the injected LoRA: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for n, p in params.items():
            if tensors[n].shape != p.shape:
                raise FormatError(f"path: {path!r} tensor {n} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[n].to(p))


def save_lora(model: torch.nn.Module, path: str | os.PathLike, metadata: dict) -> Path:
    """Write the LoRA of ``model`` to ``path`` (a folder: ``path/adapter_model.safetensors``) atomically.

    ``metadata`` must hold ``rank``, ``alpha``, ``target_modules``, ``base_sha256``; it is stored as JSON.
    """
    from safetensors.torch import save

    from ..io_utils import atomic_write_bytes

    for key in ("rank", "alpha", "target_modules", "base_sha256"):
        if key not in metadata:
            raise CorrlabError(f"metadata: expected key {key!r}, got keys {sorted(metadata)}")
    tensors = lora_state_dict(model)
    if not tensors:
        raise CorrlabError("model: holds no LoRA tensors to save")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={"corrlab_lora": json.dumps(metadata, sort_keys=True)})
    out = folder / ADAPTER_FILE
    atomic_write_bytes(out, data)
    os.chmod(out, 0o644)
    return out


def _adapter_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / ADAPTER_FILE
    if not p.is_file():
        raise WeightsNotFoundError(f"path: no LoRA adapter at {str(path)!r} (expected a folder with {ADAPTER_FILE} or the file)")
    return p


def read_lora_metadata(path: str | os.PathLike) -> dict:
    """The ``corrlab_lora`` metadata (dict) of an adapter folder or file."""
    from safetensors import safe_open

    f = _adapter_file(path)
    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata() or {}
    if "corrlab_lora" not in meta:
        raise FormatError(f"path: {str(f)!r} is not a corrlab LoRA (no 'corrlab_lora' metadata)")
    return json.loads(meta["corrlab_lora"])


class LoraHandle:
    """A LoRA loaded onto a model in place; :meth:`unload` (or leaving the ``with`` block) restores the base.

    ``metadata``: the adapter's metadata; ``model``: the denoiser it is loaded on.
    """

    def __init__(self, model: torch.nn.Module, metadata: dict, flags: dict):
        self.model, self.metadata, self._flags = model, metadata, flags
        self.loaded = True

    def unload(self) -> None:
        """Remove the LoRA (a no-op when already unloaded)."""
        if self.loaded:
            remove_lora(self.model, self._flags)
            self.loaded = False

    def __enter__(self) -> "LoraHandle":
        return self

    def __exit__(self, *exc) -> bool:
        self.unload()
        return False

    def __repr__(self) -> str:
        m = self.metadata
        return (f"LoraHandle({'loaded' if self.loaded else 'unloaded'}, rank={m.get('rank')}, loss={m.get('loss')!r}, "
                f"base step {m.get('base_step')})")


def load_lora(model_or_pipeline: Any, path: str | os.PathLike, check_base: bool = True) -> LoraHandle:
    """Load the LoRA at ``path`` (folder or file) onto the model (or pipeline's model) in place, in eval mode.

    With ``check_base`` the model's :func:`base_fingerprint` must equal the adapter's ``base_sha256``
    (else a :class:`~corrlab.errors.CorrlabError` naming both and the adapter's base step).
    """
    from safetensors.torch import load_file

    model = _denoiser(model_or_pipeline)
    f = _adapter_file(path)
    meta = read_lora_metadata(f)
    if has_lora(model):
        raise CorrlabError("model_or_pipeline: a LoRA is already loaded; unload it first")
    if check_base:
        fp = base_fingerprint(model)
        if fp != meta.get("base_sha256"):
            raise CorrlabError(
                f"path: the LoRA {str(f)!r} belongs to the base with weights sha256 {meta.get('base_sha256', '?')[:16]}... "
                f"(step {meta.get('base_step')}, {meta.get('base_name', '?')}), but the model's weights hash to "
                f"{fp[:16]}...; load it onto that base (its model card names it)"
            )
    tensors = load_file(str(f))
    flags = add_lora(model, rank=int(meta["rank"]), alpha=float(meta["alpha"]), target_modules=meta["target_modules"])
    try:
        _load_tensors(model, tensors, str(f))
    except BaseException:
        remove_lora(model, flags)
        raise
    model.eval()
    return LoraHandle(model, meta, flags)


def load_corrstar(model_or_pipeline: Any, name_or_path: str | os.PathLike = DEFAULT_CORRSTAR) -> LoraHandle:
    """Load the shipped CorrAdapter* LoRA (``data/corrlab-mvunet-s-corrstar``, or a folder) onto its base."""
    from . import DATA_DIR

    p = Path(name_or_path).expanduser()
    if not p.exists() and (DATA_DIR / str(name_or_path)).exists():
        p = DATA_DIR / str(name_or_path)
    return load_lora(model_or_pipeline, p)
