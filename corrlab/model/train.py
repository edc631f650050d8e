"""Training of :class:`MultiViewDiT` on corrlab's own procedural scenes (rectified flow).

Every step renders a fresh batch of scenes (seeded by ``(config.seed, step)``, so a run is
deterministic and resumes exactly), noises it as ``x_t = (1 - t) x0 + t eps`` and regresses the
velocity ``eps - x0`` (MSE). AdamW, linear warm-up, gradient clipping, EMA weights. The prompt is
replaced by the null embedding with probability ``cfg_dropout`` (classifier-free guidance).

Run folder layout (``out``)::

    config.json                     the TrainConfig (JSON)
    loss.jsonl                      one line per logged step: step, loss, lr, wall_s, sets_per_s
    eval.jsonl                      native-correspondence figures at eval steps (if enabled)
    checkpoints/step_0001000/       model/ (raw weights), ema/ (EMA weights), optimizer.pt, state.json
    ema/step_0001000/               EMA weights kept at every eval step (for tracking over training)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CorrlabError, FormatError, ValueRangeError, is_positive_number
from .dit import MultiViewDiT
from .rays import plucker_ray_embeds
from .unet import MultiViewUNet

#: Parameter-name endings that ``Trainer.init_from`` may leave at their initial value: parameters an option
#: adds to a shipped model with a neutral start.
ADDED_BY_OPTIONS = ("epipolar_gain", "conv_in_reference.weight", "conv_in_reference.bias")

#: The embedded model's architectures, by the name ``TrainConfig.arch`` uses.
ARCHITECTURES = {"dit": MultiViewDiT, "unet": MultiViewUNet}

__all__ = [
    "TrainConfig", "Trainer", "render_batch", "flow_matching_loss", "sample_timesteps", "sample_given",
    "export_pipeline", "write_pipeline_folder", "HELD_OUT_SEED_START", "ARCHITECTURES",
]

#: Scene seeds >= this are never used for training: they are reserved for evaluation.
HELD_OUT_SEED_START = 1_000_000


class JsonConfig:
    """``to_dict`` / ``from_dict`` / ``from_json`` of a config dataclass (unknown keys are an error)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CorrlabError(f"config: unknown keys {unknown}; expected keys among {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CorrlabError(f"config: file not found: {str(path)!r}") from None
        except json.JSONDecodeError as e:
            raise FormatError(f"config: {str(path)!r} is not valid JSON ({e})") from None
        return cls.from_dict(d)


@dataclass
class TrainConfig(JsonConfig):
    """Everything a training run depends on (JSON-able; ``TrainConfig.from_json(path)``).

    arch: "dit" (:class:`MultiViewDiT`) or "unet" (:class:`MultiViewUNet`).
    model: keyword arguments of the architecture (hidden_size, num_layers, num_heads, ... / channels, ...).
    reference_probs: probabilities of 0, 1, 2, ... clean reference views per set (capped at V - 1; the
    loss covers only the generated views); ``(1.0,)`` trains text-to-multi-view only.
    image_size: rendered view side in pixels.
    views: view counts to train on, drawn per step with probabilities ``view_probs``.
    views_per_batch: sets per step = views_per_batch // V (constant compute per step).
    lr, weight_decay, betas, warmup_steps, grad_clip: AdamW settings: linear warm-up, then constant lr,
    then (if ``decay_steps`` > 0) linear decay to ``lr * final_lr_ratio`` over the last ``decay_steps``.
    lr_scales: ``{parameter-name prefix: lr multiplier}``, e.g. ``{"conv_in_reference.": 10.0}`` for a parameter
    an option adds zero-initialised, which grows slowly at a fine-tune's lr (each prefix must name parameters; a
    parameter takes its longest matching prefix); empty = one lr for all.
    steps: total optimiser steps (the decay is anchored to it). ema_decay: EMA of the weights (ramped as min(decay, (1+s)/(10+s))).
    t_sampling: "logit_normal" (mean 0, std ``t_std``) or "uniform". cfg_dropout: null-prompt probability.
    seed: seeds scene choice, noise, t, and initialisation. train_seeds: [lo, hi) scene-seed range
    (must stay below HELD_OUT_SEED_START). layout: the renderer's camera layout, or a list of layouts (a mix:
    scene seed ``s`` is rendered in ``layout[s % len(layout)]``).
    log_every, checkpoint_every, eval_every (0 = off), eval_sets: held-out sets for the
    native-correspondence figure. device: "auto", "cpu" or "cuda". threads: torch CPU threads.
    """

    model: dict = field(
        default_factory=lambda: dict(
            sample_size=64, patch_size=4, hidden_size=128, num_layers=6, num_heads=4, mlp_ratio=3.0,
            prompt_dim=64, ray_freqs=5, scene_scale=1.0,
        )
    )
    arch: str = "dit"
    reference_probs: tuple[float, ...] = (1.0,)
    image_size: int = 64
    views: tuple[int, ...] = (2, 4)
    view_probs: tuple[float, ...] = (0.75, 0.25)
    views_per_batch: int = 16
    lr: float = 6e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    decay_steps: int = 0
    final_lr_ratio: float = 0.05
    lr_scales: dict = field(default_factory=dict)
    grad_clip: float = 1.0
    steps: int = 20_000
    ema_decay: float = 0.998
    t_sampling: str = "logit_normal"
    t_std: float = 1.0
    cfg_dropout: float = 0.1
    seed: int = 0
    train_seeds: tuple[int, int] = (0, HELD_OUT_SEED_START)
    layout: str | tuple[str, ...] = "train"
    log_every: int = 10
    checkpoint_every: int = 250
    eval_every: int = 500
    eval_sets: int = 8
    keep_checkpoints: int = 2
    device: str = "auto"
    threads: int = 1

    def __post_init__(self):
        self.views = tuple(int(v) for v in self.views)
        self.view_probs = tuple(float(p) for p in self.view_probs)
        self.betas = tuple(float(b) for b in self.betas)
        self.train_seeds = tuple(int(s) for s in self.train_seeds)
        self.reference_probs = tuple(float(p) for p in self.reference_probs)
        if self.arch not in ARCHITECTURES:
            raise CorrlabError(f"arch: expected one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if not self.reference_probs or abs(sum(self.reference_probs) - 1) > 1e-6 or min(self.reference_probs) < 0:
            raise CorrlabError(
                f"reference_probs: expected probabilities of 0, 1, 2, ... references summing to 1, got {self.reference_probs}"
            )
        if len(self.views) != len(self.view_probs) or not self.views or abs(sum(self.view_probs) - 1) > 1e-6:
            raise CorrlabError(
                f"view_probs: expected one probability per entry of views {self.views} summing to 1, got {self.view_probs}"
            )
        if any(v < 1 or self.views_per_batch // v < 1 for v in self.views):
            raise CorrlabError(f"views: expected counts in [1, views_per_batch={self.views_per_batch}], got {self.views}")
        lo, hi = self.train_seeds
        if not 0 <= lo < hi <= HELD_OUT_SEED_START:
            raise CorrlabError(
                f"train_seeds: expected [lo, hi) with 0 <= lo < hi <= {HELD_OUT_SEED_START} (held-out seeds are reserved), "
                f"got {self.train_seeds}"
            )
        if not isinstance(self.lr_scales, dict) or any(
            not isinstance(k, str) or not k or not is_positive_number(v) for k, v in self.lr_scales.items()
        ):
            raise ValueRangeError(
                f"lr_scales: expected {{parameter-name prefix: positive multiplier}}, got {self.lr_scales!r}"
            )
        self.lr_scales = {k: float(v) for k, v in self.lr_scales.items()}
        if self.t_sampling not in ("logit_normal", "uniform"):
            raise CorrlabError(f"t_sampling: expected 'logit_normal' or 'uniform', got {self.t_sampling!r}")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueRangeError(f"cfg_dropout: expected a probability in [0, 1), got {self.cfg_dropout!r}")
        from ..scenes import LAYOUTS

        if not isinstance(self.layout, str):
            self.layout = tuple(str(x) for x in self.layout)
        layouts = layout_tuple(self.layout)
        if not layouts or any(x not in LAYOUTS for x in layouts):
            raise CorrlabError(f"layout: expected one of {LAYOUTS} or a non-empty list of them, got {self.layout!r}")
        if self.image_size % int(self.model.get("patch_size", 4)):
            raise CorrlabError(f"image_size: expected a multiple of the patch size, got {self.image_size}")


# ---------------------------------------------------------------------------- pure pieces
def lr_scale_groups(model: torch.nn.Module, lr_scales: dict[str, float]) -> list[dict]:
    """Optimiser parameter groups for ``TrainConfig.lr_scales``: one group of the parameters no prefix names
    (``lr_scale`` 1.0), then one per prefix, in the dict's order (a parameter goes to its longest matching
    prefix); without scales, one group as before, so runs without them resume unchanged. Raises
    :class:`ValueRangeError` for a prefix that names no parameter."""
    named = list(model.named_parameters())
    owner = {n: max((k for k in lr_scales if n.startswith(k)), key=len, default=None) for n, _ in named}
    unused = [k for k in lr_scales if k not in owner.values()]
    if unused:
        raise ValueRangeError(f"lr_scales: prefix {unused[0]!r} names no parameter of the {type(model).__name__}")
    keys = [None, *lr_scales]
    return [{"params": [p for n, p in named if owner[n] == k], "lr_scale": 1.0 if k is None else lr_scales[k]}
            for k in keys]


def sample_timesteps(n: int, mode: str, generator: torch.Generator, std: float = 1.0) -> torch.Tensor:
    """``(n,)`` training times in (0, 1): logit-normal(0, std) or uniform."""
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(std * torch.randn(n, generator=generator))


def flow_matching_loss(
    model: MultiViewDiT | MultiViewUNet,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    ray_embeds: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    given: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow MSE: ``x0 (B, V, 3, H, W)`` in [-1, 1], ``t (B,)``, ``noise`` like x0 -> scalar.

    ``given (B, V)`` bool: reference views enter clean (flagged) and are left out of the loss.
    """
    tt = t.view(-1, 1, 1, 1, 1).to(x0)
    x_t = (1 - tt) * x0 + tt * noise
    if given is None:
        v = model(x_t, t, prompt_embeds, ray_embeds)
        return torch.nn.functional.mse_loss(v.float(), (noise - x0).float())
    x_in = torch.where(given[:, :, None, None, None], x0, x_t)
    v = model(x_in, t, prompt_embeds, ray_embeds, given=given)
    err = (v.float() - (noise - x0).float()).pow(2).mean(dim=(2, 3, 4))  # (B, V)
    w = (~given).float()
    return (err * w).sum() / w.sum().clamp_min(1.0)


def sample_given(config: TrainConfig, batch: int, views: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, V)`` bool reference masks: per set, ``k ~ reference_probs`` (capped at ``V - 1``) random views."""
    probs = torch.tensor(config.reference_probs, dtype=torch.float64)
    k = torch.multinomial(probs, batch, replacement=True, generator=generator).clamp(max=views - 1)
    order = torch.rand(batch, views, generator=generator).argsort(dim=1)
    return order < k[:, None]


def layout_tuple(layout: str | Sequence[str]) -> tuple[str, ...]:
    """A ``TrainConfig.layout`` (one camera layout or several) as a tuple of layouts."""
    return (layout,) if isinstance(layout, str) else tuple(layout)


def render_batch(seeds: Sequence[int], views: int, size: int, layout: str | Sequence[str], patch_size: int,
                 scene_scale: float):
    """Render scenes -> ``(images (B, V, 3, H, W) in [-1, 1], prompts list[str], rays (B, V, 6, h, w))``.

    ``layout``: one camera layout, or several: seed ``s`` is rendered in ``layout[s % len(layout)]``."""
    from ..scenes import render_scene

    layouts = layout_tuple(layout)
    imgs, prompts, rays = [], [], []
    for s in seeds:
        mvs = render_scene(int(s), views, size, layouts[int(s) % len(layouts)])
        imgs.append(mvs.images * 2.0 - 1.0)
        prompts.append(mvs.prompt)
        rays.append(plucker_ray_embeds(mvs.cameras, size, patch_size, scene_scale))
    return torch.stack(imgs).float(), prompts, torch.stack(rays)


def step_plan(config: TrainConfig, step: int) -> tuple[int, list[int]]:
    """View count and scene seeds of optimiser step ``step`` (a pure function of config.seed and step)."""
    rng = np.random.default_rng([config.seed, step])
    V = int(rng.choice(config.views, p=config.view_probs))
    n = config.views_per_batch // V
    seeds = rng.integers(config.train_seeds[0], config.train_seeds[1], size=n).tolist()
    return V, seeds


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every floating parameter, in place."""
    with torch.no_grad():
        e = [p for p in ema.parameters()]
        m = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(e, m, 1.0 - decay)


def _atomic_json_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints ``out/checkpoints/step_XXXXXXX`` (those with a ``state.json``), oldest first."""
    root = Path(out) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / "state.json").is_file()) if root.is_dir() else []


def write_checkpoint(out: Path, step: int, write_files: Callable[[Path], None], state: dict, keep: int) -> Path:
    """Atomically write ``out/checkpoints/step_{step:07d}``: ``write_files(tmp_dir)`` fills a temporary sibling,
    ``state.json`` (``state``) marks it complete, ``os.replace`` publishes it; only the newest ``keep`` stay."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
    write_files(tmp)
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Owns model, EMA copy and optimiser; ``run()`` trains to ``config.steps`` with checkpoints."""

    def __init__(self, config: TrainConfig, out: str | os.PathLike, eval_fn: Callable | None = None):
        self.config = config
        self.out = Path(out)
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        if self.device.type == "cpu" and config.threads > 0:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        cls = ARCHITECTURES[config.arch]
        self.model = cls(**config.model).to(self.device)
        self.ema = cls(**config.model).to(self.device)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(
            lr_scale_groups(self.model, config.lr_scales), lr=config.lr, weight_decay=config.weight_decay,
            betas=config.betas,
        )
        self.step = 0
        self.wall = 0.0
        self.cpu = 0.0  # CPU seconds of this process spent in training steps (all threads), over all resumes
        self._warmup_from = 0  # the lr warm-up restarts here after init_from (fresh optimiser)
        self.eval_fn = eval_fn

    # ------------------------------------------------------------ checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        return checkpoint_dirs(self.out)

    def save_checkpoint(self) -> Path:
        def write_files(tmp: Path) -> None:
            self.model.save_pretrained(tmp / "model", safe_serialization=True)
            self.ema.save_pretrained(tmp / "ema", safe_serialization=True)
            torch.save(self.opt.state_dict(), tmp / "optimizer.pt")

        state = {"step": self.step, "wall_s": self.wall, "cpu_s": self.cpu}
        return write_checkpoint(self.out, self.step, write_files, state, self.config.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest checkpoint under ``out/checkpoints``; False when there is none."""
        dirs = self.checkpoint_dirs()
        if not dirs:
            return False
        ck = dirs[-1]
        cls = ARCHITECTURES[self.config.arch]
        self.model.load_state_dict(cls.from_pretrained(ck / "model", low_cpu_mem_usage=False).state_dict())
        self.ema.load_state_dict(cls.from_pretrained(ck / "ema", low_cpu_mem_usage=False).state_dict())
        try:
            self.opt.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True, map_location=self.device))
        except ValueError as e:  # other parameter groups
            raise CorrlabError(
                f"resume: {str(ck)!r} was trained with other lr_scales than {self.config.lr_scales!r}: {e}"
            ) from None
        state = json.loads((ck / "state.json").read_text())
        self.step, self.wall = int(state["step"]), float(state["wall_s"])
        self.cpu = float(state.get("cpu_s", 0.0))
        return True

    def init_from(self, model_dir: str | os.PathLike) -> None:
        """Load shipped weights (a :class:`CorrlabPipeline` folder written by :func:`export_pipeline`) into
        the model AND its EMA; the step (and CPU seconds) come from its ``checkpoint.json``; the optimiser
        state is not shipped, so it starts fresh (the lr warm-up runs again from that step)."""
        d = Path(model_dir)
        sub = d / "model" if (d / "model" / "config.json").is_file() else d
        if not (sub / "config.json").is_file():
            raise CorrlabError(f"init_from: expected a model folder with model/config.json, got {str(d)!r}")
        cls = ARCHITECTURES[self.config.arch]
        name = json.loads((sub / "config.json").read_text()).get("_class_name")
        if name != cls.__name__:
            raise CorrlabError(f"init_from: the run's arch is {cls.__name__} but {str(d)!r} holds a {name}")
        state = cls.from_pretrained(sub, low_cpu_mem_usage=False).state_dict()
        for target in (self.model, self.ema):
            try:
                missing, unexpected = target.load_state_dict(state, strict=False)
            except RuntimeError as e:  # a parameter of another shape
                raise CorrlabError(f"init_from: {str(d)!r} does not match the run's model: {e}") from None
            # parameters an option adds with a neutral start (MultiViewUNet(epipolar_bias=True): zero gains) may be absent
            # and so may whole decoder-only blocks (MultiViewUNet(decoder_attention_levels=...)), which start neutral
            added = tuple(f"{b}." for b in getattr(target, "decoder_only_blocks", lambda: [])())
            new = [k for k in missing if not k.endswith(ADDED_BY_OPTIONS) and not k.startswith(added)]
            if new or unexpected:
                raise CorrlabError(
                    f"init_from: {str(d)!r} does not match the run's model: missing {new[:4]}, unexpected {unexpected[:4]}"
                )
        info = json.loads((d / "checkpoint.json").read_text()) if (d / "checkpoint.json").is_file() else {}
        self.step = int(info.get("step", 0))
        self.wall = float(info.get("wall_s", 0.0))
        self.cpu = float(info.get("cpu_s", 0.0))
        self._warmup_from = self.step

    # ------------------------------------------------------------ training
    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (warm-up, constant, optional linear decay)."""
        cfg = self.config
        lr = cfg.lr * min(1.0, (step + 1 - self._warmup_from) / max(1, cfg.warmup_steps))
        if cfg.decay_steps > 0:
            left = (cfg.steps - step) / cfg.decay_steps
            lr *= min(1.0, max(cfg.final_lr_ratio, left))
        return lr

    def train_step(self) -> float:
        """One optimiser step at ``self.step``; returns the loss."""
        cfg = self.config
        V, seeds = step_plan(cfg, self.step)
        x0, prompts, rays = render_batch(
            seeds, V, cfg.image_size, cfg.layout, int(self.model.config.patch_size), float(self.model.config.scene_scale)
        )
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        B = x0.shape[0]
        t = sample_timesteps(B, cfg.t_sampling, g, cfg.t_std)
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(B, generator=g) < cfg.cfg_dropout
        given = sample_given(cfg, B, V, g) if len(cfg.reference_probs) > 1 else None
        x0, rays, t, noise, drop = (a.to(self.device) for a in (x0, rays, t, noise, drop))
        given = given.to(self.device) if given is not None else None
        self.model.train()
        pe = self.model.encode_prompt(prompts)
        pe = torch.where(drop[:, None], self.model.null_prompt_embeds(B), pe)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = flow_matching_loss(self.model, x0, pe, rays, t, noise, given)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema_update(self.ema, self.model, decay)
        self.step += 1
        return float(loss.detach())

    def run(self, steps: int | None = None, progress: bool = True) -> None:
        cfg = self.config
        total = cfg.steps if steps is None else steps
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log = self.out / "loss.jsonl"
        bar = tqdm(total=total, initial=self.step, desc="train", disable=not progress, dynamic_ncols=True)
        window, t_last, n_sets = [], time.time(), 0
        while self.step < total:
            t0, c0 = time.time(), time.process_time()
            V, seeds = step_plan(cfg, self.step)
            loss = self.train_step()
            self.wall += time.time() - t0
            self.cpu += time.process_time() - c0
            window.append(loss)
            n_sets += len(seeds)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == total:
                now = time.time()
                rec = {
                    "step": self.step, "loss": float(np.mean(window)), "lr": self.lr_at(self.step - 1),
                    "wall_s": round(self.wall, 2), "cpu_s": round(self.cpu, 1),
                    "sets_per_s": round(n_sets / max(now - t_last, 1e-9), 3),
                }
                _atomic_json_line(log, rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                window, t_last, n_sets = [], now, 0
            if self.step % cfg.checkpoint_every == 0 or self.step == total:
                self.save_checkpoint()
            if cfg.eval_every and self.eval_fn is not None and (self.step % cfg.eval_every == 0 or self.step == total):
                keep = self.out / "ema" / f"step_{self.step:07d}"
                self.ema.save_pretrained(keep, safe_serialization=True)
                try:
                    rec = self.eval_fn(self.ema, cfg)
                except Exception as e:  # the tracking figure must never kill a long run
                    rec = {"error": repr(e)}
                _atomic_json_line(self.out / "eval.jsonl",
                                  {"step": self.step, "wall_s": round(self.wall, 2), "cpu_s": round(self.cpu, 1), **rec})
        bar.close()


def export_pipeline(checkpoint: str | os.PathLike, out: str | os.PathLike, which: str = "ema") -> Path:
    """Write the ``which`` ("ema" or "model") weights of a run checkpoint as a :class:`CorrlabPipeline` folder.

    ``checkpoint`` is ``RUN/checkpoints/step_XXXXXXX``; the run's config.json is copied to
    ``out/train_config.json`` when found. The folder is assembled in a temporary sibling and renamed.
    """
    from .pipeline import MODEL_CLASSES

    ck = Path(checkpoint)
    if which not in ("ema", "model") or not (ck / which / "config.json").is_file():
        raise CorrlabError(f"checkpoint: expected a folder with {which}/config.json, got {str(ck)!r} (which={which!r})")
    arch = json.loads((ck / which / "config.json").read_text()).get("_class_name", "MultiViewDiT")
    if arch not in MODEL_CLASSES:
        raise CorrlabError(f"checkpoint: {str(ck / which)!r} holds a {arch!r}; expected one of {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[arch].from_pretrained(ck / which, low_cpu_mem_usage=False)
    extra = {"checkpoint.json": json.dumps({"checkpoint": str(ck), "weights": which,
                                            **json.loads((ck / "state.json").read_text())}, indent=2)}
    run_config = ck.parent.parent / "config.json"
    if run_config.is_file():
        extra["train_config.json"] = run_config.read_text()
    return write_pipeline_folder(model, out, extra)


def write_pipeline_folder(model, out: str | os.PathLike, extra: dict[str, str] | None = None,
                          keep: tuple[str, ...] = ("README.md", "samples.png", "quality.json", "training_curve.json")
                          ) -> Path:
    """Write ``model`` as a :class:`CorrlabPipeline` folder at ``out``, atomically: assembled in a temporary
    sibling with the ``extra`` text files (name -> text) and world-readable files, the ``keep`` files of an
    existing ``out`` carried over (a model card stays with re-exported weights), then renamed into place."""
    from .pipeline import CorrlabPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    CorrlabPipeline(model).save_pretrained(tmp)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700 folders: shipped files are world-readable
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if out.exists():
        for name in keep:
            if (out / name).exists() and not (tmp / name).exists():
                shutil.copy(out / name, tmp / name)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
