"""Personalization (paper section 3.2): train one adapter per identity on a frozen base.

Loss per identity (eq. 5, :mod:`pfstorer.losses`): ``L_diff + lambda_gen * L_gen + lambda_pers * L_pers``:
- ``L_diff`` (eq. 2): the distance to the preset's target with the LQ synthesized from a random
  reference crop (degradation pipeline, clean with probability p_HQ) and another reference photo
  of the person (its features computed once and cached, :meth:`PackedTrainer.reference_features`);
- ``L_gen`` (eq. 4): the same with the null LQ input, so the adapter must carry the identity;
- ``L_pers``: ViCo's attention regulariser on the token ``*``.

References that show a whole scene are first cut to their face, framed as the base saw faces in
training (:mod:`pfstorer.framing`); face crops are used as they are.

Packed training: one :class:`PackedTrainer` keeps ``capacity`` identities in adapter slots of one
frozen base and steps them together in one batch. The loss is the sum of each identity's own mean
loss and the optimiser is per slot (Adam with a step count per slot), so every identity gets exactly
the updates it would get alone; each draws all its randomness from its own seed. Slots are refilled
from the job stream as identities finish, and each adapter is emitted as soon as it is done.
A slot's whole state (:class:`SlotState`) can be taken between steps and put into another
trainer, which then continues bit for bit as the first would have: a run that loses a worker
resumes its people instead of training them again.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import Adapter, AdapterMetadata
from .config import PersonalizeConfig, TrainingSpeed
from .errors import ReferenceCountError
from .framing import frame_face
from .losses import LossTerms, diffusion_loss, distance, generative_loss, pers_loss
from .model import RestorationModel, timestep_grid
from .personalization import (
    AdapterWeights,
    PBRun,
    ReferenceCapture,
    block_specs,
    pool_reference,
)
from .prior import Prior, resolve_prior


@dataclass
class PersonalizeJob:
    identity: str
    references: Sequence[torch.Tensor]
    seed: int | None = None
    tenant: str | None = None
    reference_names: list[str] = field(default_factory=list)


def center_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Central square crop of the short side, resized to ``size``: the view cached for inference."""
    h, w = img.shape[-2:]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    crop = img[..., y : y + s, x : x + s].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=s > size, align_corners=False)[0].clamp(0, 1)


def check_references(refs: Sequence[torch.Tensor], config: PersonalizeConfig) -> None:
    n = len(refs)
    if n < config.min_refs:
        raise ReferenceCountError(f"{n} reference photo(s) given; personalization needs at least {config.min_refs}")
    if n > config.max_refs:
        raise ReferenceCountError(f"{n} reference photos given; at most {config.max_refs} are used per identity")


class SlotAdamW:
    """AdamW over tensors with a leading slot axis; each slot has its own step count."""

    def __init__(self, params: list[torch.nn.Parameter], slots: int, lr: float | list[float], weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = params
        self.lrs = lr if isinstance(lr, list) else [lr] * len(params)  # one learning rate per tensor
        self.wd, self.betas, self.eps = weight_decay, betas, eps
        # moments and bias corrections in float32 whatever the parameters' dtype: in bf16,
        # 0.999 rounds to 1.0, so 1 - b2**t was 0 and the first step wrote NaN into the adapter
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.t = torch.zeros(slots, dtype=torch.long)

    def reset(self, slot: int) -> None:
        self.t[slot] = 0
        for m, v in zip(self.m, self.v, strict=True):
            m[slot].zero_()
            v[slot].zero_()

    @torch.no_grad()
    def slot_state(self, slot: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int]:
        """CPU copies of one slot's parameters, moments and step count."""
        def rows(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t[slot].detach().to("cpu", copy=True) for t in ts]

        return rows(self.params), rows(self.m), rows(self.v), int(self.t[slot])

    @torch.no_grad()
    def load_slot(self, slot: int, params: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
                  t: int) -> None:
        """Put a :meth:`slot_state` back (into this or another optimizer of the same layout)."""
        if len(params) != len(self.params) or any(
            tuple(x.shape) != tuple(p.shape[1:]) for x, p in zip(params, self.params, strict=True)
        ):
            raise ValueError("the slot state was taken on another base or adapter layout")
        for p, pm, pv, x, xm, xv in zip(self.params, self.m, self.v, params, m, v, strict=True):
            p[slot] = x.to(p.device, p.dtype)
            pm[slot] = xm.to(pm.device)
            pv[slot] = xv.to(pv.device)
        self.t[slot] = t

    @torch.no_grad()
    def step(self, active: list[int]) -> None:
        b1, b2 = self.betas
        idx = torch.tensor(active)
        self.t[idx] += 1
        for p, m, v, lr in zip(self.params, self.m, self.v, self.lrs, strict=True):
            if p.grad is None or not p.requires_grad:
                continue
            i = idx.to(p.device)
            t = self.t[idx].to(p.device, torch.float32).view(-1, *([1] * (p.dim() - 1)))
            g = p.grad[i].float()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1**t)
            vhat = v[i] / (1 - b2**t)
            pf = p[i].float()
            p[i] = (pf - lr * (mhat / (vhat.sqrt() + self.eps) + self.wd * pf)).to(p.dtype)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


@dataclass
class _Slot:
    job: PersonalizeJob
    refs: list[torch.Tensor]
    ref_tokens: list[torch.Tensor]  # per block: [n_refs, P, C], the frozen base's reference features
    rng: np.random.Generator
    gen: torch.Generator
    step: int = 0
    curve: list[float] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)
    probe_start: float = float("nan")
    started: float = field(default_factory=time.perf_counter)
    ahead: Future | None = None  # the next step's draw, prefetched
    ahead_from: tuple[dict, torch.Tensor] | None = None  # the generators' states that draw started from


@dataclass
class SlotState:
    """Everything that continues one identity's training where it stopped (CPU tensors, picklable):
    the adapter's tensors and AdamW moments (each parameter's row of the slot), the step, the loss
    curve and the state of the identity's generators before its next draw."""

    step: int
    params: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    adam_t: int
    rng: dict
    gen: torch.Tensor
    curve: list[float]
    parts: dict[str, float]
    probe_start: float
    seconds: float


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _prefetch_pool() -> ThreadPoolExecutor:
    """Threads that draw training batches ahead of the step (crops, degradations, encoding):
    numpy, PIL and torch release the GIL in their heavy parts, so drawing overlaps the UNet."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pfstorer-draw")
        return _POOL


class PackedTrainer:
    """Trains up to ``capacity`` identities at once on one frozen base (capacity 1 = solo).

    ``speed`` (bf16 autocast, gradient checkpointing) changes how the hardware is used, not
    the method: see :class:`~pfstorer.config.TrainingSpeed`. Every slot starts from the reference
    prior ``config.prior`` names (:func:`~pfstorer.prior.resolve_prior`), or from zero without one.
    """

    def __init__(
        self,
        model: RestorationModel,
        config: PersonalizeConfig = PersonalizeConfig(),
        capacity: int = 1,
        speed: TrainingSpeed = TrainingSpeed(),
    ) -> None:
        self.model = model.freeze().gradient_checkpointing(speed.gradient_checkpointing)
        self.config = config
        self.capacity = capacity
        self.speed = speed
        self.gen_rows = min(config.gen_rows or config.batch_size, config.batch_size)
        # rows of the frozen base per identity and step: what a step costs
        self.rows_per_identity = config.batch_size + (self.gen_rows if config.lambda_gen > 0 else 0)
        self.weights = AdapterWeights(block_specs(model), model.config.cross_attention_dim, capacity).to(model.device, model.dtype)
        self.prior: Prior | None = resolve_prior(model, config.prior)
        if not config.learn_alpha:
            for a in self.weights.alpha:
                a.requires_grad_(False)
        params = list(self.weights.parameters())
        gates = {id(a) for a in self.weights.alpha}
        lrs = [config.alpha_lr if id(p) in gates else config.lr for p in params]
        self.opt = SlotAdamW(params, capacity, lrs, config.weight_decay)
        self.slots: dict[int, _Slot] = {}
        # draw_s: time spent drawing batches (any thread); wait_s: time the step waited for them;
        # ahead: draws made in the background while a step trained
        self.data_stats = {"steps": 0, "draw_s": 0.0, "wait_s": 0.0, "ahead": 0}
        self._stats_lock = threading.Lock()
        self._prefetch = speed.prefetch == "on" or (speed.prefetch == "auto" and model.device.type == "cuda")

    # -- slots -------------------------------------------------------------------------------
    def add(self, job: PersonalizeJob, resume: SlotState | None = None) -> int:
        """Put ``job`` in a free slot: fresh, or continuing from ``resume`` (:meth:`snapshot`)."""
        check_references(job.references, self.config)
        free = [i for i in range(self.capacity) if i not in self.slots]
        if not free:
            raise RuntimeError("no free slot")
        k = free[0]
        seed = self.config.seed if job.seed is None else job.seed
        gen = torch.Generator("cpu").manual_seed(seed)
        self.weights.init_slot(k, gen, self.model.prompt, None if self.prior is None else self.prior.tensors)
        if not self.config.learn_alpha:
            with torch.no_grad():
                for a in self.weights.alpha:
                    a[k].fill_(1.0)
        self.opt.reset(k)
        refs = self.prepare_references(job.references)
        self.slots[k] = _Slot(job, refs, self.reference_features(refs), np.random.default_rng(seed), gen)
        if resume is None:
            self.slots[k].probe_start = self.probe_loss(k)
        else:
            self._restore(k, resume)
        return k

    def snapshot(self, k: int) -> SlotState:
        """Slot ``k``'s training state between two steps (see :class:`SlotState`)."""
        slot = self.slots[k]
        rng, gen = slot.ahead_from if slot.ahead is not None else (slot.rng.bit_generator.state, slot.gen.get_state())
        params, exp_avg, exp_avg_sq, adam_t = self.opt.slot_state(k)
        return SlotState(
            step=slot.step, params=params, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, adam_t=adam_t, rng=rng,
            gen=gen.clone(), curve=list(slot.curve), parts=dict(slot.parts), probe_start=slot.probe_start,
            seconds=time.perf_counter() - slot.started,
        )

    def _restore(self, k: int, state: SlotState) -> None:
        self.opt.load_slot(k, state.params, state.exp_avg, state.exp_avg_sq, state.adam_t)
        slot = self.slots[k]
        slot.rng.bit_generator.state = state.rng
        slot.gen.set_state(state.gen)
        slot.step, slot.curve, slot.parts = state.step, list(state.curve), dict(state.parts)
        slot.probe_start = state.probe_start
        slot.started = time.perf_counter() - state.seconds

    @property
    def free(self) -> int:
        return self.capacity - len(self.slots)

    # -- one step of every active identity ---------------------------------------------------
    def _next_draw(self, slot: _Slot) -> dict[str, torch.Tensor]:
        """This step's inputs of one identity: the prefetched draw, or drawn now."""
        t = time.perf_counter()
        if slot.ahead is not None:
            future, slot.ahead = slot.ahead, None
            out = future.result()
        else:
            out = self._timed_draw(slot)
        self.data_stats["wait_s"] += time.perf_counter() - t
        return out

    def _timed_draw(self, slot: _Slot) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        try:
            return self._draw(slot)
        finally:
            with self._stats_lock:
                self.data_stats["draw_s"] += time.perf_counter() - t

    def _draw(self, slot: _Slot) -> dict[str, torch.Tensor]:
        """All random inputs of one identity's step, from that identity's own generators only
        (so a draw made ahead, in another thread, is the draw it would have been)."""
        return self.draw(slot.refs, slot.rng, slot.gen)

    def draw(self, refs: Sequence[torch.Tensor], rng: np.random.Generator, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One person's step inputs from their (prepared) photos ``refs``: ``batch_size`` targets,
        each a random crop of one photo degraded to its LQ, attending to *another* photo's
        reference features (``ref``: its index in ``refs``); noise and timesteps. Random only
        through ``rng`` and ``gen``."""
        from .degradations import random_crop_resize, synthesize_lq

        c, size, b = self.config, self.model.config.sample_size, self.config.batch_size
        hq, lq, ref = [], [], []
        n = len(refs)
        for _ in range(b):
            i = int(rng.integers(n))
            crop = random_crop_resize(refs[i], size, rng, c.crop_scale)
            hq.append(crop)
            lq.append(synthesize_lq(crop, rng, levels=c.levels, p_hq=c.p_hq))
            # the reference is another photo of the person: its own photo would teach copying
            j = int(rng.integers(max(1, n - 1)))
            ref.append(j + (j >= i) if n > 1 else i)
        m = self.model
        with torch.no_grad():
            z0, lq_lat = (m.to_latent(torch.stack(x)) for x in (hq, lq))
        ref_idx = torch.tensor(ref)  # which reference's features each row attends to
        shape = tuple(z0.shape)
        total = m.config.train_t_max  # the timesteps the preset samples
        t = torch.randint(0, total, (b,), generator=gen)
        t_start = m.config.sampling.t_start
        p_start = c.p_lq_start if t_start < m.config.num_train_timesteps else 0.0
        start = torch.rand(b, generator=gen) < p_start  # rows as restore starts: from the diffused LQ
        out = {"z0": z0, "lq": lq_lat, "ref": ref_idx, "noise": torch.randn(shape, generator=gen),
               "t": torch.where(start, torch.full_like(t, t_start), t), "start": start}
        if c.lambda_gen > 0:
            g = self.gen_rows
            out["noise_gen"] = torch.randn((g, *shape[1:]), generator=gen)
            out["t_gen"] = torch.randint(0, total, (g,), generator=gen)
        return out

    def _noisy(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from .sampling import diffuse

        return diffuse(self.model, z0, noise, t)

    def step(self) -> list[Adapter]:
        """One optimisation step of all active identities; returns the adapters that finished."""
        active = sorted(self.slots)
        done: list[Adapter] = []
        if not active:
            return done
        todo = [k for k in active if self.slots[k].step < self.config.steps]
        if todo:
            self._train_step(todo)
        for k in active:
            if self.slots[k].step >= self.config.steps:
                done.append(self._finish(k))
        return done

    def _train_step(self, active: list[int]) -> None:
        """One step of every active identity: all their rows in one batch of the frozen base,
        the sum of each identity's eq. 5 loss, and a per-slot optimiser step."""
        c, m = self.config, self.model
        draws = {k: self._next_draw(self.slots[k]) for k in active}
        self._draw_ahead(active)
        all_terms = self.batch_loss_terms(draws, {k: self.slots[k].ref_tokens for k in active}, {k: k for k in active})
        total = torch.zeros((), device=m.device)
        for k in active:
            terms = all_terms[k]
            loss_k = terms.total(c.lambda_gen, c.lambda_pers)
            total = total + loss_k
            self.slots[k].curve.append(float(loss_k.detach()))
            self.slots[k].parts = terms.as_floats()
        self.opt.zero_grad()
        total.backward()
        self.opt.step(active)
        self.data_stats["steps"] += 1
        for k in active:
            self.slots[k].step += 1

    def _draw_ahead(self, active: list[int]) -> None:
        """Start drawing the next step's batches in the background, while this one trains."""
        if not self._prefetch:
            return
        pool = _prefetch_pool()
        for k in active:
            slot = self.slots[k]
            if slot.step + 1 < self.config.steps:
                slot.ahead_from = (slot.rng.bit_generator.state, slot.gen.get_state())
                slot.ahead = pool.submit(self._timed_draw, slot)
                self.data_stats["ahead"] += 1

    def batch_loss_terms(self, draws: dict[int, dict[str, torch.Tensor]], ref_tokens: dict[int, list[torch.Tensor]],
                         weight_slots: dict[int, int]) -> dict[int, LossTerms]:
        """The eq. 5 terms of every draw (:meth:`draw`), all rows in one batch of the frozen base.

        Draw ``k`` (an identity, or one person of a reference prior's batch) attends to its
        reference features ``ref_tokens[k]`` (per block ``[n_refs, P, C]``, picked by the draw's
        ``ref``) through adapter slot ``weight_slots[k]``: its own slot when each identity trains
        its adapter, one shared slot when a prior is trained across people.
        """
        c, m = self.config, self.model
        keys = list(draws)
        x, t, lq, row_keys, refs = self._pack(keys, draws, ref_tokens)
        maps: list[tuple[torch.Tensor, torch.Tensor]] = []
        pb = PBRun(self.weights, torch.tensor([weight_slots[k] for k in row_keys], device=m.device), m.prompt,
                   m.config.adapter.ref_pool, ref_tokens=refs, maps=maps)
        with torch.autocast(m.device.type, torch.bfloat16, enabled=self.speed.autocast_bf16):
            pred = m.denoise(x, t, lq, pb)
        pers_rows = pers_loss(maps) if c.lambda_pers > 0 else None
        return {k: self._loss_terms(j, len(keys), draws[k], pred, pers_rows, [i for i, s in enumerate(row_keys) if s == k])
                for j, k in enumerate(keys)}

    def _pack(self, active: list[int], draws: dict[int, dict[str, torch.Tensor]],
              ref_tokens: dict[int, list[torch.Tensor]],
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[torch.Tensor]]:
        """The batch of one step: the L_diff rows of every identity (noised HQ or, for rows drawn
        as sampling starts, noised LQ; eq. 2), then, with lambda_gen > 0, the L_gen rows (null LQ;
        eq. 4) of each identity's first ``gen_rows`` crops. Returns the noisy inputs, timesteps,
        LQs, each row's key and each row's reference tokens per block."""
        m = self.model
        xs, ts, lqs, row_slots, refs = [], [], [], [], []
        for gen in (False, True) if self.config.lambda_gen > 0 else (False,):
            n = self.gen_rows if gen else self.config.batch_size  # each identity's rows of this part
            for k in active:
                d = draws[k]
                if not gen:
                    src = torch.where(d["start"].view(-1, 1, 1, 1), d["lq"], d["z0"])
                    xs.append(self._noisy(src, d["noise"], d["t"]))
                    ts.append(d["t"])
                    lqs.append(d["lq"])
                else:
                    xs.append(self._noisy(d["z0"][:n], d["noise_gen"], d["t_gen"]))
                    ts.append(d["t_gen"])
                    lqs.append(m.null_lq(d["lq"][:n]))
                row_slots += [k] * n
                refs.append((k, d["ref"][:n]))
        rows = [torch.cat([ref_tokens[k][i][idx] for k, idx in refs]) for i in range(len(self.weights.specs))]
        return torch.cat(xs), torch.cat(ts).to(m.device), torch.cat(lqs), row_slots, rows

    def _loss_terms(self, j: int, n_active: int, d: dict[str, torch.Tensor], pred: torch.Tensor,
                    pers_rows: torch.Tensor | None, own_rows: list[int]) -> LossTerms:
        """The eq. 5 terms of the ``j``-th active identity, from its rows of the packed prediction
        (see :meth:`_pack`); ``own_rows``: all its rows, where its token's maps are."""
        c, m, b = self.config, self.model, self.config.batch_size
        dist = distance(c, m)

        def target(z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return m.target(z0, noise).to(m.device).float()

        terms = LossTerms(diffusion_loss(dist, pred[j * b:(j + 1) * b].float(), target(d["z0"], d["noise"])))
        if c.lambda_gen > 0:
            g = self.gen_rows
            null_rows = slice(n_active * b + j * g, n_active * b + (j + 1) * g)
            terms.gen = generative_loss(dist, pred[null_rows].float(), target(d["z0"][:g], d["noise_gen"]))
        if pers_rows is not None:
            terms.pers = pers_rows[own_rows].mean()
        return terms

    # -- evaluation and export ---------------------------------------------------------------
    @torch.no_grad()
    def probe_loss(self, k: int) -> float:
        """Diffusion loss on a fixed batch (fixed crop, degradation, noise, timesteps).

        Training losses are noisy (random t, crops); this probe shows whether the adapter helps.
        """
        from .degradations import degrade

        m, slot = self.model, self.slots.get(k)
        refs = slot.refs if slot else []
        if not refs:
            return float("nan")
        size = m.config.sample_size
        hq = center_square(refs[0], size)
        lq = degrade(hq, "heavy", 1234)
        ts = torch.tensor(timestep_grid(4, m.config.train_t_max))
        z0 = m.to_latent(hq.unsqueeze(0)).expand(len(ts), -1, -1, -1)
        lq_lat = m.to_latent(lq.unsqueeze(0)).expand(len(ts), -1, -1, -1)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1234)).to(z0)
        n = len(ts)
        ref_tokens = [r[-1:].expand(n, -1, -1) for r in slot.ref_tokens]  # the last reference
        pb = PBRun(self.weights, torch.full((n,), k, device=m.device), m.prompt, m.config.adapter.ref_pool,
                   ref_tokens=ref_tokens)
        pred = m.denoise(self._noisy(z0, noise, ts), ts.to(m.device), lq_lat, pb)
        return float(F.mse_loss(pred.float(), m.target(z0, noise).float()))

    def prepare_references(self, photos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reference photos as training uses them: cut to the face where they show a scene
        (:func:`~pfstorer.framing.frame_face`), big ones shrunk (cheap random crops)."""
        size = self.model.config.sample_size
        return [_limit_side(frame_face(r.float()), 2 * size) for r in photos]

    @torch.no_grad()
    def reference_features(self, refs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The frozen base's features of each reference at every block, pooled: ``[n_refs, P, C]``
        per block. Computed once per identity (centre square at the native size, t = 0, the
        reference as its own LQ): training attends to them, and the adapter caches them."""
        m = self.model
        shape = m.config.adapter
        lat = m.to_latent(torch.stack([center_square(r, m.config.sample_size) for r in refs]))
        capture = ReferenceCapture()
        m.denoise(lat, torch.zeros(len(refs), dtype=torch.long, device=m.device), lat, capture)
        return [pool_reference(capture.features[i], shape.ref_pool) for i in range(len(capture.features))]

    def reference_tokens(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """What an adapter caches of an identity's :meth:`reference_features`: per block
        ``[cache_refs * P, C]`` (references repeated in turn when there are fewer)."""
        n = int(features[0].shape[0])
        chosen = torch.tensor([i % n for i in range(self.model.config.adapter.cache_refs)])
        return [r[chosen].flatten(0, 1) for r in features]

    def _finish(self, k: int) -> Adapter:
        m, c = self.model, self.config
        probe_end = self.probe_loss(k)
        slot = self.slots.pop(k)
        tensors = self.weights.export_slot(k, m.prompt, self.reference_tokens(slot.ref_tokens))
        tail = slot.curve[-10:]
        losses = {**slot.parts, "total_last10": float(np.mean(tail)) if tail else float("nan"),
                  "probe_start": slot.probe_start, "probe_end": probe_end,
                  "seconds": time.perf_counter() - slot.started}
        meta = AdapterMetadata(
            identity=slot.job.identity, tenant=slot.job.tenant, base_fingerprint=m.fingerprint,
            base_preset=m.config.name, config=c.model_dump(mode="json") | {
                "seed": slot.job.seed if slot.job.seed is not None else c.seed,
                "prior_sha256": None if self.prior is None else self.prior.sha256},
            steps=slot.step, final_losses={k2: v for k2, v in losses.items() if not math.isnan(v)},
            loss_curve=slot.curve, references=list(slot.job.reference_names),
        )
        return Adapter(tensors, meta)

    # -- driving ------------------------------------------------------------------------------
    def run(self, jobs: Iterable[PersonalizeJob], progress: Callable[[int], None] | None = None) -> Iterator[Adapter]:
        """Train every job, refilling free slots from ``jobs``; yield adapters as they finish."""
        it = iter(jobs)
        exhausted = False
        while True:
            while not exhausted and self.free:
                job = next(it, None)
                if job is None:
                    exhausted = True
                else:
                    self.add(job)
            if not self.slots:
                return
            n = len([s for s in self.slots.values() if s.step < self.config.steps])
            yield from self.step()
            if progress is not None and n:
                progress(n)


def _limit_side(img: torch.Tensor, max_short: int) -> torch.Tensor:
    """Shrink so the short side is at most ``max_short`` (cheap random crops of big photos)."""
    h, w = img.shape[-2:]
    s = min(h, w)
    if s <= max_short:
        return img
    f = max_short / s
    size = (max(1, round(h * f)), max(1, round(w * f)))
    return F.interpolate(img.unsqueeze(0), size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)


def personalize(
    model: RestorationModel,
    references: Sequence[torch.Tensor],
    *,
    identity: str,
    config: PersonalizeConfig = PersonalizeConfig(),
    tenant: str | None = None,
    reference_names: Sequence[str] = (),
    progress: bool = False,
) -> Adapter:
    """Train one identity's adapter from 3-20 reference photos ([3,H,W] in [0,1])."""
    return personalize_many(
        model, [PersonalizeJob(identity, references, config.seed, tenant, list(reference_names))],
        config=config, capacity=1, progress=progress,
    )[0]


def personalize_many(
    model: RestorationModel,
    jobs: Sequence[PersonalizeJob],
    *,
    config: PersonalizeConfig = PersonalizeConfig(),
    capacity: int = 4,
    speed: TrainingSpeed = TrainingSpeed(),
    progress: bool = False,
) -> list[Adapter]:
    """Train several identities packed ``capacity`` at a time; adapters in the order of ``jobs``."""
    trainer = PackedTrainer(model, config, capacity=max(1, min(capacity, len(jobs))), speed=speed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps * len(jobs), desc="personalize", unit="step")
    out = {(a.metadata.tenant, a.identity): a for a in trainer.run(jobs, progress=bar.update if bar else None)}
    if bar:
        bar.close()
    return [out[(j.tenant, j.identity)] for j in jobs]
