"""CorrAdapter* training: a LoRA on the multi-view attention, flow loss + lambda x a consistency loss at
EXACT correspondences (the renderer's depth), on a frozen base (CorrAdapter Eq. 14-15, methods.md section 2).

``L = L_flow + lambda * L_cons`` with ``L_cons`` one of:

* ``"eq14"`` (the paper's): :func:`~corrlab.model.consistency.feature_consistency_loss` on the features
  entering each multi-view attention block of ``layers`` (``f_in``, the block input ``(B, V, C, h, w)``), at
  the true correspondences of every ordered view pair. Default layer: ``blocks.4.attn`` (the finest decoder
  layer; the encoder's ``blocks.0`` input has no attention before it, so an attention LoRA cannot change it).
* ``"attention-ce"``: :func:`~corrlab.model.consistency.attention_ce_loss` of the layer's own q and k
  (through the LoRA) towards the true token. Default layers: the finest-grid layers (``blocks.0.attn``,
  ``blocks.4.attn``: the ones CorrAdapter adapts by default).

Data: every step renders ``sets_per_step`` fresh training scenes (seeds < ``HELD_OUT_SEED_START``) of
``views`` views with depth; 0/1/2 clean reference views per set as in the base training (loss on the
generated views only; correspondences over all views, given ones included). Deterministic in
``(seed, step)``, so a run resumes exactly.

Run folder (``out``)::

    config.json        the ConsistencyConfig
    loss.jsonl         step, loss, flow, consistency, lr, wall_s, cpu_s
    checkpoints/step_0000100/   adapter_model.safetensors, optimizer.pt, state.json
    lora/              the final adapter (adapter_model.safetensors with its metadata), for load_lora
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CorrlabError, check_choice
from .consistency import attention_ce_loss, feature_consistency_loss, token_correspondences
from .train import JsonConfig, checkpoint_dirs, write_checkpoint
from .lora import ATTENTION_TARGETS, ADAPTER_FILE, add_lora, base_fingerprint, save_lora

__all__ = ["ConsistencyConfig", "ConsistencyTrainer", "LOSSES", "consistency_step_plan"]

LOSSES = ("eq14", "attention-ce")


@dataclass
class ConsistencyConfig(JsonConfig):
    """Everything a CorrAdapter* run depends on (JSON-able).

    base: the base pipeline folder (or name under ``data/``); loss: ``"eq14"`` or ``"attention-ce"``;
    lam: lambda of Eq. 15 (0.1, the paper's); layers: attention layers the consistency loss reads (None =
    the loss's default, see the module docstring); rank, alpha: LoRA size (16, the paper's rank); steps, lr,
    warmup_steps, grad_clip, weight_decay: AdamW on the LoRA only; views, sets_per_step, image_size (None = the
    model's sample size), layout: the rendered batch; reference_probs: probabilities of 0, 1, 2 clean references per set (capped at
    ``views - 1``); t_std: logit-normal time sampling; cfg_dropout: null-prompt probability; seed;
    train_seeds: [lo, hi) scene seeds (below the held-out range); log_every, checkpoint_every, keep_checkpoints;
    threads: torch CPU threads.
    """

    base: str = "corrlab-mvunet-s"
    loss: str = "eq14"
    lam: float = 0.1
    layers: list | None = None
    rank: int = 16
    alpha: float = 16.0
    steps: int = 500
    lr: float = 1e-3
    warmup_steps: int = 20
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    views: int = 4
    sets_per_step: int = 2
    image_size: int | None = None
    layout: str = "train"
    reference_probs: tuple = (0.2, 0.5, 0.3)
    t_std: float = 1.0
    cfg_dropout: float = 0.1
    seed: int = 0
    train_seeds: tuple = (0, 1_000_000)
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    threads: int = 1

    def __post_init__(self):
        from .train import HELD_OUT_SEED_START

        check_choice("loss", self.loss, LOSSES)
        self.reference_probs = tuple(float(p) for p in self.reference_probs)
        self.train_seeds = tuple(int(s) for s in self.train_seeds)
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0):
            raise CorrlabError(f"lam: expected a number >= 0, got {self.lam!r}")
        if self.views < 2:
            raise CorrlabError(f"views: expected >= 2 (correspondences need two views), got {self.views}")
        if abs(sum(self.reference_probs) - 1) > 1e-6 or min(self.reference_probs) < 0:
            raise CorrlabError(f"reference_probs: expected probabilities summing to 1, got {self.reference_probs}")
        lo, hi = self.train_seeds
        if not 0 <= lo < hi <= HELD_OUT_SEED_START:
            raise CorrlabError(f"train_seeds: expected [lo, hi) within [0, {HELD_OUT_SEED_START}), got {self.train_seeds}")
        if self.steps < 1 or self.sets_per_step < 1:
            raise CorrlabError(f"steps, sets_per_step: expected positive ints, got {self.steps}, {self.sets_per_step}")


def consistency_step_plan(config: ConsistencyConfig, step: int) -> list[int]:
    """Scene seeds of optimiser step ``step`` (a pure function of ``config.seed`` and ``step``)."""
    rng = np.random.default_rng([config.seed, 7, step])
    return rng.integers(config.train_seeds[0], config.train_seeds[1], size=config.sets_per_step).tolist()


class _Capture:
    """Forward pre-hooks collecting each loss layer's input during one forward."""

    def __init__(self, model, layers: list[str], kind: str):
        self.model, self.kind, self.store = model, kind, {}
        self.handles = []
        for name in layers:
            attn = model.get_submodule(name)
            if kind == "eq14":
                block = model.get_submodule(name.rsplit(".", 1)[0])  # blocks.{i}: its input x (B*V, C, h, w)
                self.handles.append(block.register_forward_pre_hook(self._hook(name)))
            else:
                self.handles.append(attn.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args):
            self.store[name] = args[0]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class ConsistencyTrainer:
    """Owns the base (frozen) with its LoRA and the optimiser; ``run()`` trains to ``config.steps``."""

    def __init__(self, config: ConsistencyConfig, out: str | os.PathLike, model=None, base_info: dict | None = None):
        """``model``: a denoiser to train on (default: ``load_default(config.base)``'s model)."""
        self.config = config
        self.out = Path(out)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        if model is None:
            from . import load_default, resolve_model_path

            model = load_default(config.base).model
            path = resolve_model_path(config.base)
            ck = path / "checkpoint.json"
            base_info = {"base_name": path.name, **({"base_step": json.loads(ck.read_text()).get("step")} if ck.is_file() else {})}
        encoding = getattr(model.config, "relative_encoding", "none")
        changed = (f"relative_encoding={encoding!r}" if encoding != "none"
                   else "epipolar_bias=True" if getattr(model.config, "epipolar_bias", False) else None)
        if config.loss == "attention-ce" and changed:
            raise CorrlabError(
                f"loss: 'attention-ce' reads q and k from to_q / to_k, but a model with {changed} changes the "
                "logits inside attention; use loss 'eq14'"
            )
        self.model = model
        if config.image_size is None:
            config.image_size = int(model.config.sample_size)
        self.base_info = dict(base_info or {})
        self.base_sha256 = base_fingerprint(model)
        grids = model.attention_grids(config.image_size, config.image_size)
        if config.layers is None:
            if config.loss == "eq14":
                layers = [max(grids, key=lambda n: (grids[n][0] * grids[n][1], int(n.split(".")[1])))]
            else:
                finest = max(h * w for h, w in grids.values())
                layers = [n for n, (h, w) in grids.items() if h * w == finest]
        else:
            layers = list(config.layers)
        unknown = [n for n in layers if n not in grids]
        if unknown:
            raise CorrlabError(f"layers: unknown {unknown}; expected names among {sorted(grids)}")
        self.layers, self.grids = layers, grids
        self._flags = add_lora(model, rank=config.rank, alpha=config.alpha)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.step, self.wall, self.cpu = 0, 0.0, 0.0

    # -------------------------------------------------------------- checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        return checkpoint_dirs(self.out)

    def metadata(self) -> dict:
        c = self.config
        return {"rank": c.rank, "alpha": c.alpha, "target_modules": ATTENTION_TARGETS, "base_sha256": self.base_sha256,
                **self.base_info, "loss": c.loss, "lambda": c.lam, "layers": self.layers, "steps": self.step,
                "train_wall_s": round(self.wall, 1), "train_cpu_s": round(self.cpu, 1),
                "base_class": type(self.model).__name__}

    def save_checkpoint(self) -> Path:
        def write_files(tmp: Path) -> None:
            save_lora(self.model, tmp, self.metadata())
            torch.save(self.opt.state_dict(), tmp / "optimizer.pt")

        state = {"step": self.step, "wall_s": self.wall, "cpu_s": self.cpu, "base_sha256": self.base_sha256}
        return write_checkpoint(self.out, self.step, write_files, state, self.config.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest checkpoint under ``out/checkpoints`` (it must belong to the same base)."""
        from safetensors.torch import load_file

        from .lora import _load_tensors

        dirs = self.checkpoint_dirs()
        if not dirs:
            return False
        ck = dirs[-1]
        state = json.loads((ck / "state.json").read_text())
        if state.get("base_sha256") != self.base_sha256:
            raise CorrlabError(f"--resume: {str(ck)!r} was trained on another base (sha256 {str(state.get('base_sha256'))[:16]}...)")
        _load_tensors(self.model, load_file(str(ck / ADAPTER_FILE)), str(ck))
        self.opt.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
        self.step, self.wall, self.cpu = int(state["step"]), float(state["wall_s"]), float(state["cpu_s"])
        return True

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """Write the current adapter (``out/lora`` by default) for :func:`corrlab.model.lora.load_lora`."""
        return save_lora(self.model, Path(path) if path else self.out / "lora", self.metadata()).parent

    # -------------------------------------------------------------- training
    def lr_at(self, step: int) -> float:
        return self.config.lr * min(1.0, (step + 1) / max(1, self.config.warmup_steps))

    def batch(self, step: int):
        """The rendered batch of ``step``: images, prompts, rays, given, correspondences per loss layer."""
        from ..scenes import render_scene
        from .rays import plucker_ray_embeds
        from .train import sample_timesteps

        c = self.config
        m = self.model
        seeds = consistency_step_plan(c, step)
        sets = [render_scene(int(s), c.views, c.image_size, c.layout) for s in seeds]
        x0 = torch.stack([s.images * 2 - 1 for s in sets]).float()
        rays = torch.stack([plucker_ray_embeds(s.cameras, c.image_size, int(m.config.patch_size), float(m.config.scene_scale))
                            for s in sets])
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        B, V = x0.shape[:2]
        t = sample_timesteps(B, "logit_normal", g, c.t_std)
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(B, generator=g) < c.cfg_dropout
        probs = torch.tensor(c.reference_probs, dtype=torch.float64)
        k = torch.multinomial(probs, B, replacement=True, generator=g).clamp(max=V - 1)
        given = torch.rand(B, V, generator=g).argsort(dim=1) < k[:, None]
        corr = {}
        for name in self.layers:
            grid = self.grids[name]
            corr[name] = [token_correspondences(s, grid) for s in sets]
        return x0, [s.prompt for s in sets], rays, t, noise, drop, given, corr

    def losses(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flow loss, consistency loss)`` of ``step``'s batch (one forward, with graphs)."""
        from .train import flow_matching_loss

        x0, prompts, rays, t, noise, drop, given, corr = self.batch(step)
        m = self.model
        m.train()
        B, V = x0.shape[:2]
        pe = m.encode_prompt(prompts)
        pe = torch.where(drop[:, None], m.null_prompt_embeds(B), pe)
        cap = _Capture(m, self.layers, self.config.loss)
        try:
            flow = flow_matching_loss(m, x0, pe, rays, t, noise, given)
        finally:
            cap.remove()
        cons = []
        for name in self.layers:
            h, w = self.grids[name]
            x = cap.store[name]
            if self.config.loss == "eq14":  # block input (B*V, C, h, w)
                cons.append(feature_consistency_loss(x.reshape(B, V, *x.shape[1:]), corr[name]))
            else:  # attention input (B, V*h*w, C): q, k through the (LoRA) projections
                attn = m.get_submodule(name)
                heads = attn.heads
                q = attn.to_q(x).reshape(B, V, h * w, heads, -1).permute(0, 1, 3, 2, 4)
                kk = attn.to_k(x).reshape(B, V, h * w, heads, -1).permute(0, 1, 3, 2, 4)
                cons.append(attention_ce_loss(q, kk, corr[name], float(attn.scale)))
        return flow, torch.stack(cons).mean()

    def train_step(self) -> dict:
        flow, cons = self.losses(self.step)
        loss = flow + self.config.lam * cons
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.opt.step()
        self.step += 1
        return {"loss": float(loss.detach()), "flow": float(flow.detach()), "consistency": float(cons.detach())}

    def run(self, steps: int | None = None, progress: bool = True) -> Path:
        """Train to ``steps`` (default ``config.steps``), checkpointing; writes ``out/lora`` at the end."""
        c = self.config
        total = c.steps if steps is None else steps
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
        bar = tqdm(total=total, initial=self.step, desc=f"train-consistency ({c.loss})", disable=not progress,
                   dynamic_ncols=True)
        window: list[dict] = []
        while self.step < total:
            t0, c0 = time.time(), time.process_time()
            rec = self.train_step()
            self.wall += time.time() - t0
            self.cpu += time.process_time() - c0
            window.append(rec)
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == total:
                line = {"step": self.step, **{k: float(np.mean([r[k] for r in window])) for k in window[0]},
                        "lr": self.lr_at(self.step - 1), "wall_s": round(self.wall, 2), "cpu_s": round(self.cpu, 1)}
                with open(self.out / "loss.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
                bar.set_postfix(flow=f"{line['flow']:.4f}", cons=f"{line['consistency']:.4f}")
                window = []
            if self.step % c.checkpoint_every == 0 or self.step == total:
                self.save_checkpoint()
        bar.close()
        return self.export()
