"""``pfstorer train-base``: train a restoration base model (paper section 3.3) with Ray Train.

The way the paper trains its base, on our data:

- **data**: one split of one or more ``index.csv`` sources (``identity,path,split``) such as
  ``../shared/data/lfw128`` and ``../shared/data/faces1024``, each with its typical face width
  (``--face-px``) and share of the draws (``--source-weights``); ``split=bench`` is refused and
  training stops if any training identity is also a bench identity (benchmarks must never have
  seen their people). Every photo is decoded **once** and put in the Ray object store, so workers
  on one node share it (10.5 k lfw128 photos = 500 MB; ``--limit`` takes a seeded subset);
- **inputs** (:mod:`pipelines.base_data`): a random square crop (no alignment) of a random photo,
  either a fraction of the photo resized to the crop or, with ``--face-scale``, a native-scale tile
  of the photo rescaled so its face has a random width (faces of every size a photo has); its LQ
  from :func:`pfstorer.degradations.synthesize_lq` (``light``/``heavy`` mixed, the clean crop
  itself with ``p_HQ = 0.03``) or, with ``--p-sr``, a x4 super-resolution input; drawn on the fly
  inside each worker from a generator seeded by ``(seed, worker rank, step)`` — so a resumed run
  sees exactly the batches an uninterrupted one would;
- **loss** (:mod:`pfstorer.base_objective`): the distance (``--loss mse`` or ``l1``) of the denoiser's output to its target at
  random timesteps of ``[0, train_t_max)``, the range the preset samples: the noise for epsilon
  presets, the clean image for ``x0_residual`` ones. For presets that sample from the LQ diffused
  to ``t_start``, a share ``--p-lq-start`` of the rows is drawn exactly so (the LQ, not the clean
  image, diffused to ``t_start``), so the first sampling step is trained on what it will see.
  ``--loss-weighting trunc-snr`` multiplies the per-row loss by ``max(1, 1/SNR(t))`` (Salimans &
  Ho's truncated SNR weighting: for epsilon presets, the image-space error where noise dominates).
  AdamW, linear warm-up then cosine decay to 10 %, gradient clipping, optional EMA of the weights
  (what gets shipped; warmed up), optional bf16 autocast on CUDA;
- **detail** (``--adv-weight``, :mod:`pfstorer.adversarial`): a patch discriminator trained beside
  the model; the x0 estimates of the rows drawn as sampling starts must look real to it (from
  ``--adv-start``, ramped over ``--adv-ramp`` steps), so one-step sampling returns texture, not the
  posterior mean's blur;
- **probe**: ``--holdout N`` keeps N photos (whole people; at most a tenth) of every source out of
  training; every ``--probe-every`` steps their clean-image-estimate PSNR at fixed timesteps (fixed
  degradations and noise; for LQ-started presets also from the LQ diffused to ``t_start``, with its
  sharpness) is logged next to the inputs' own PSNR and kept in the loss curve;
- **throughput**: ``--loader-workers N`` synthesizes batches ahead in N processes per worker (a
  DataLoader over step indices, so batches do not depend on N); a GPU needs several;
- **Ray Train**: a :class:`ray.train.torch.TorchTrainer`; with several workers the model is wrapped
  in DDP by :func:`ray.train.torch.prepare_model` (gloo on CPU, NCCL on GPU) and ``--batch-size`` is
  the global batch, split evenly;
- **checkpoints**: every ``--checkpoint-every`` steps rank 0 reports a checkpoint
  (``config.json`` + ``model.safetensors`` of the raw weights, so ``load_base(ckpt)`` reads it;
  ``ema.safetensors``; ``optimizer.pt``; the discriminator and its optimizer; ``state.json`` with
  the step and loss history) with
  ``ray.train.report(..., checkpoint=Checkpoint.from_directory(...))`` to the store
  (``--store``, default ``OUT/checkpoints``; any URL Ray Train accepts). ``--resume`` re-runs the
  last run of that store under the same name, so Ray hands the latest checkpoint back and training
  continues from its step, weights, optimizer state and loss history;
- **output**: ``OUT/config.json`` + ``OUT/model.safetensors`` (``RestorationModel.save``; the EMA
  weights when EMA is on), ``OUT/loss_curve.json`` with the probes (+ ``loss_curve.png`` when
  matplotlib is there).

Modules: :mod:`~pipelines.train_base.config` (what a run computes), :mod:`~pipelines.train_base.loop`
(the worker's step loop), :mod:`~pipelines.train_base.holdout_probe`, :mod:`~pipelines.train_base.checkpoints`,
:mod:`~pipelines.train_base.driver` (data, the Ray Train run, outputs), :mod:`~pipelines.train_base.plots`,
:mod:`~pipelines.train_base.blend` and :mod:`~pipelines.train_base.cli`.
"""

from typing import Any

from pipelines.train_base.cli import main, register_cli

__all__ = ["Source", "TrainBaseConfig", "TrainBaseResult", "blend_weights", "holdout_people", "load_split",
           "main", "register_cli", "train_base"]

# Imported on first use: `pfstorer --help` registers this command without loading torch or Ray.
_LAZY = {
    "Source": "pipelines.base_data", "holdout_people": "pipelines.base_data", "load_split": "pipelines.base_data",
    "blend_weights": "pipelines.train_base.blend", "TrainBaseConfig": "pipelines.train_base.config",
    "TrainBaseResult": "pipelines.train_base.config", "train_base": "pipelines.train_base.driver",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
