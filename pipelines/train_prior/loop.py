"""The step of a reference-prior run: personalization's loss over many people, one shared slot.

Each step draws ``people_per_step`` people and, per person, ``photos_per_person`` of their
photos; each target (a random crop degraded light or heavy) attends to the frozen base's reference
features of *another* of those photos, exactly as a personalization step of that person would
(:meth:`pfstorer.training.PackedTrainer.draw`, :meth:`~pfstorer.training.PackedTrainer.reference_features`,
:meth:`~pfstorer.training.PackedTrainer.batch_loss_terms`), except that every row uses the same
adapter slot. The loss is the mean over people of eq. 5; AdamW (the trainer's) updates the slot.

All randomness of step ``s`` comes from ``(seed, s)``, so a run resumed from a checkpoint draws
the batches an uninterrupted one would. Photos are decoded and framed once and kept (as 8-bit,
up to ``PREPARED_CACHE_BYTES``): people come back step after step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pfstorer.images import load_image
from pfstorer.losses import LossTerms
from pfstorer.training import PackedTrainer
from pipelines.train_prior.config import TrainPriorConfig

SLOT = 0  # the one adapter slot every row trains
PREPARED_CACHE_BYTES = 2 << 30  # framed reference photos kept in memory, 8-bit


class PreparedPhotos:
    """Each photo decoded and framed as training uses it (:meth:`PackedTrainer.prepare_references`)
    once, kept as 8-bit up to ``max_bytes`` (then the oldest go first).

    The kept copy is the framed float photo rounded to 8 bits: the photo was 8-bit before framing,
    so this differs from framing afresh by at most half a level, and equally on every visit."""

    def __init__(self, trainer: PackedTrainer, max_bytes: int = PREPARED_CACHE_BYTES) -> None:
        self.trainer, self.max_bytes, self.bytes = trainer, max_bytes, 0
        self.kept: dict[str, torch.Tensor] = {}

    def __call__(self, paths: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for path in paths:
            if (img := self.kept.get(path)) is None:
                (framed,) = self.trainer.prepare_references([load_image(path)])
                img = (framed.clamp(0, 1) * 255).round().to(torch.uint8)
                self.kept[path] = img
                self.bytes += img.numel()
                while self.bytes > self.max_bytes and len(self.kept) > 1:
                    self.bytes -= self.kept.pop(next(iter(self.kept))).numel()
            out.append(img.float() / 255)
        return out


class PriorTrainer:
    """One shared slot of personalization blocks trained across people on a frozen base."""

    def __init__(self, model, config: TrainPriorConfig) -> None:
        self.config = config
        self.trainer = PackedTrainer(model, config.personalize(), capacity=1)
        self.trainer.weights.init_slot(SLOT, torch.Generator().manual_seed(config.seed), model.prompt)
        self.photos = PreparedPhotos(self.trainer)
        self.step = 0

    @property
    def model(self):
        return self.trainer.model

    def _batch(self, people: Sequence[tuple[str, list[str]]], seeds: Sequence[int]
               ) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, list[torch.Tensor]]]:
        """Draws and reference features of each person (key: position in ``people``)."""
        t = self.trainer
        draws, feats = {}, {}
        photos = []
        for k, ((_, paths), seed) in enumerate(zip(people, seeds, strict=True)):
            rng = np.random.default_rng(seed)
            n = min(self.config.photos_per_person, len(paths))
            chosen = sorted(rng.choice(len(paths), size=n, replace=False).tolist())
            refs = self.photos([paths[i] for i in chosen])
            photos.append(refs)
            draws[k] = t.draw(refs, rng, torch.Generator().manual_seed(int(rng.integers(2**62))))
        flat = t.reference_features([r for refs in photos for r in refs])  # one base call for the batch
        start = 0
        for k, refs in enumerate(photos):
            feats[k] = [f[start:start + len(refs)] for f in flat]
            start += len(refs)
        return draws, feats

    def _terms(self, people: Sequence[tuple[str, list[str]]], seeds: Sequence[int],
               others: bool = False) -> list[LossTerms]:
        """Eq. 5 terms of each person; with ``others``, each attends to the next person's
        references instead of their own (what the blocks get from identity, not from any face)."""
        draws, feats = self._batch(people, seeds)
        if others:
            n = len(draws)
            feats = {k: feats[(k + 1) % n] for k in draws}
            draws = {k: d | {"ref": d["ref"] % int(feats[k][0].shape[0])} for k, d in draws.items()}
        terms = self.trainer.batch_loss_terms(draws, feats, {k: SLOT for k in draws})
        return [terms[k] for k in draws]

    def _mean(self, terms: list[LossTerms]) -> torch.Tensor:
        c = self.config
        return torch.stack([x.total(c.lambda_gen, c.lambda_pers) for x in terms]).mean()

    def train_step(self, people: dict[str, list[str]]) -> float:
        """One AdamW step on ``people_per_step`` people drawn from ``people``; the mean loss."""
        c = self.config
        rng = np.random.default_rng([c.seed, self.step])
        names = sorted(people)
        pick = rng.choice(len(names), size=min(c.people_per_step, len(names)), replace=False)
        batch = [(names[i], people[names[i]]) for i in pick]
        loss = self._mean(self._terms(batch, [int(s) for s in rng.integers(2**62, size=len(batch))]))
        opt = self.trainer.opt
        opt.zero_grad()
        loss.backward()
        opt.step([SLOT])
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def probe(self, people: dict[str, list[str]]) -> dict[str, float]:
        """Eq. 5 and L_diff on held-out people, each with the same draw at every probe; and
        eq. 5 with every person attending to another's references (``probe_loss_other_refs``):
        the gap between the two is what the blocks take from the person's own references."""
        if not people:
            return {}
        names = sorted(people)
        batch = [(n, people[n]) for n in names]
        seeds = [self.config.seed * 1_000_003 + i for i in range(len(names))]
        terms = self._terms(batch, seeds)
        out = {"probe_loss": float(self._mean(terms)), "probe_diff": float(torch.stack([x.diff for x in terms]).mean())}
        if len(names) > 1:
            out["probe_loss_other_refs"] = float(self._mean(self._terms(batch, seeds, others=True)))
        return out

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return self.trainer.weights.slot_tensors(SLOT)
