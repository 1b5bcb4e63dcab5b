"""``pfstorer train-base`` and ``pfstorer blend-base``: the command line of base training."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.base_data import Source


def _sources(data: list[str], face_px: list[float] | None, weights: list[float] | None) -> list[Source]:
    """``--data`` folders with their ``--face-px`` and ``--source-weights`` (one each, or none)."""
    from pfstorer.errors import InputError
    from pipelines.base_data import Source

    for name, vals in (("--face-px", face_px), ("--source-weights", weights)):
        if vals is not None and len(vals) != len(data):
            raise InputError(f"{name} needs one value per --data source ({len(data)}), got {len(vals)}")
    return [Source(data=d, **({"face_px": face_px[i]} if face_px else {}),
                   **({"weight": weights[i]} if weights else {})) for i, d in enumerate(data)]


def _cmd(args: argparse.Namespace) -> int:
    from pipelines.train_base.config import TrainBaseConfig
    from pipelines.train_base.driver import train_base

    fields = {
        "base": args.base, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "workers": args.workers, "use_gpu": args.use_gpu, "bf16": args.bf16, "checkpoint_every": args.checkpoint_every,
        "init": args.init, "seed": args.seed, "loss_weighting": args.loss_weighting, "ema": args.ema, "crop": args.crop, "threads": args.threads,
        "log_every": args.log_every, "loader_workers": args.loader_workers, "weight_decay": args.weight_decay, "warmup": args.warmup,
        "crop_scale": tuple(args.crop_scale), "keep_checkpoints": args.keep_checkpoints, "loss": args.loss,
        "p_lq_start": args.p_lq_start, "holdout": args.holdout, "probe_every": args.probe_every,
        "face_scale": tuple(args.face_scale) if args.face_scale else None, "p_sr": args.p_sr,
        "adv_weight": args.adv_weight, "fm_weight": args.fm_weight, "disc_lr": args.disc_lr,
        "disc_width": args.disc_width, "adv_start": args.adv_start, "adv_ramp": args.adv_ramp,
        "detail_weight": args.detail_weight, "structure_weight": args.structure_weight,
        "detail_inputs": tuple(args.detail_inputs) if args.detail_inputs else None,
    }
    if args.init and "://" not in args.init and Path(args.init).exists():  # workers run elsewhere
        fields["init"] = str(Path(args.init).resolve())
    config = TrainBaseConfig(**{k: v for k, v in fields.items() if v is not None})
    sources = _sources(args.data, args.face_px, args.source_weights)
    res = train_base(data=sources, out=args.out, config=config, split=args.split, limit=args.limit,
                     store=args.store, resume=args.resume, verbose=not args.quiet)
    print(json.dumps(res.model_dump(), indent=2))
    return 0


def _cmd_blend(args: argparse.Namespace) -> int:
    from pipelines.train_base.blend import blend_weights

    fp = blend_weights(args.fidelity, args.detail, args.weight, args.out)
    print(f"blended {args.fidelity} (x{1 - args.weight:g}) and {args.detail} (x{args.weight:g}) -> {args.out} "
          f"(fingerprint {fp})")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-base", help="train a base restoration model (Ray Train)",
        description="Train a base model of a preset on the photos of one split of an index.csv "
                    "(identity,path,split): random crops, synthetic light/heavy degradations "
                    "(clean input with p=0.03), the preset's diffusion loss (noise or x0 target) at the "
                    "timesteps it samples; --holdout probes held-out PSNR. Ray Train TorchTrainer "
                    "(DDP with several workers); checkpoints to --store; --resume continues. Writes "
                    "OUT/config.json + model.safetensors (load with --base OUT) and OUT/loss_curve.json.",
    )
    p.add_argument("--base", default="compact", help="preset to train (default: compact)")
    p.add_argument("--data", required=True, nargs="+",
                   help="folders or URLs holding index.csv and the photos (several: mixed by --source-weights)")
    p.add_argument("--face-px", type=float, nargs="+",
                   help="typical face width in pixels of each --data source's photos (default 90: lfw128)")
    p.add_argument("--source-weights", type=float, nargs="+", help="relative share of draws per source (default equal)")
    p.add_argument("--face-scale", type=float, nargs=2, metavar=("LO", "HI"),
                   help="train on native-scale crops of photos rescaled so faces are LO-HI px wide (log-uniform); "
                        "default: --crop-scale fractions resized to the crop")
    p.add_argument("--p-sr", type=float, help="share of x4 super-resolution inputs (default 0)")
    p.add_argument("--adv-weight", type=float,
                   help="weight of the adversarial (detail) loss against a patch discriminator (default 0: off)")
    p.add_argument("--fm-weight", type=float, help="feature-matching weight in the adversarial loss (default 1)")
    p.add_argument("--adv-start", type=int, help="step the adversarial loss starts acting (default 0)")
    p.add_argument("--adv-ramp", type=int, help="steps over which its weight rises to --adv-weight (default 0)")
    p.add_argument("--detail-weight", type=float,
                   help="weight of the detail-energy loss: the restored face must carry as much fine detail, "
                        "window by window, as the truth (default 0: off)")
    p.add_argument("--structure-weight", type=float,
                   help="weight of the structure loss on the rows the detail objectives act on: the restored "
                        "face's 4x4 px means must be the truth's, so texture is redrawn on top of the right "
                        "shapes (default 0: off)")
    p.add_argument("--detail-inputs", nargs="+", metavar="KIND",
                   help="kinds of input the detail objectives act on, of clean, light, heavy and x4 (default: all); "
                        "e.g. 'heavy x4' leaves lightly degraded and clean inputs to the L1 term, which copies "
                        "the detail they already hold")
    p.add_argument("--disc-lr", type=float, help="discriminator learning rate (default 2e-4)")
    p.add_argument("--disc-width", type=int, help="discriminator width (default 32)")
    p.add_argument("--split", default="train", help="split of index.csv to train on (bench is refused)")
    p.add_argument("--limit", type=int, help="train on a seeded subset of this many photos")
    p.add_argument("--steps", type=int, default=1000, help="total optimisation steps")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=int, help="warm-up steps (default: 5%% of steps, at most 500)")
    p.add_argument("--ema", type=float, help="EMA decay of the saved weights (default 0: off)")
    p.add_argument("--loss-weighting", choices=["eps", "trunc-snr"],
                   help="eps: unweighted (the paper, default); trunc-snr: x max(1, 1/SNR(t))")
    p.add_argument("--loss", choices=["mse", "l1"], help="distance to the target (default mse)")
    p.add_argument("--p-lq-start", type=float,
                   help="share of rows drawn as sampling starts, the LQ diffused to the preset's t_start (default 0.5)")
    p.add_argument("--holdout", type=int,
                   help="hold this many photos (whole people) out of training for the PSNR probe (default 0)")
    p.add_argument("--probe-every", type=int, help="probe the held-out photos every N steps (default 250)")
    p.add_argument("--crop", type=int, help="training crop size in pixels (default: the preset's tile)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.6, 1.0), metavar=("LO", "HI"),
                   help="crop side as a fraction of the photo's short side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (weights, loss curve, run record)")
    p.add_argument("--store", help="checkpoint store: folder or URL (default: OUT/checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the last run recorded in OUT")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers (DDP when > 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument("--loader-workers", type=int,
                   help="processes per worker synthesizing batches ahead (default 0; use several on a GPU)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="report a checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--init", help="initial weights: a checkpoint folder of the same preset")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd)

    b = subparsers.add_parser(
        "blend-base", help="interpolate two checkpoints of a base: the fidelity <-> detail knob",
        description="Network interpolation of two checkpoints of one preset (EMA weights when present): "
                    "(1 - W) x FIDELITY + W x DETAIL, saved as a base folder (float16). Made for an "
                    "adversarial fine-tune (train-base --adv-weight) and the checkpoint it started from: W = 0 "
                    "is the faithful, smoother one, W = 1 the sharper one.")
    b.add_argument("--fidelity", required=True, help="checkpoint folder of the faithful end (W = 0)")
    b.add_argument("--detail", required=True, help="checkpoint folder of the detailed end (W = 1)")
    b.add_argument("--weight", type=float, required=True, help="W in [0, 1]")
    b.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    b.set_defaults(func=_cmd_blend)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train_base")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train-base", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)
