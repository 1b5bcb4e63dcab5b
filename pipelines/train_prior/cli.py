"""``pfstorer train-prior``: the command line of reference-prior training."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _cmd(args: argparse.Namespace) -> int:
    from pipelines.train_prior.config import TrainPriorConfig
    from pipelines.train_prior.driver import train_prior

    fields = {"base": args.base, "steps": args.steps, "people_per_step": args.people_per_step,
              "targets_per_person": args.targets_per_person, "photos_per_person": args.photos_per_person,
              "lr": args.lr, "alpha_lr": args.alpha_lr, "lambda_gen": args.lambda_gen, "probe_people": args.probe_people,
              "probe_every": args.probe_every, "checkpoint_every": args.checkpoint_every, "log_every": args.log_every,
              "limit_people": args.limit_people, "seed": args.seed}
    config = TrainPriorConfig(**{k: v for k, v in fields.items() if v is not None})
    res = train_prior(args.data, args.out, config, split=args.split, weights=args.weights, device=args.device,
                      threads=args.threads, resume=args.resume, verbose=not args.quiet)
    print(json.dumps(res, indent=2))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-prior", help="train a base's reference prior (adapters that use references at 0 steps)",
        description="Train the personalization blocks' shared starting weights (alpha and the token included) "
                    "across many people on a frozen base: each step a batch of people, one degraded target each "
                    "attending to the reference features of another photo of that person, personalization's loss "
                    "(L_diff + lambda_gen L_gen + lambda_pers L_pers), AdamW. People need two or more photos in "
                    "--split (bench is refused); --probe-people of them are held out for a validation loss. "
                    "Writes OUT/prior.safetensors (copy it beside the base's model.safetensors to ship it), "
                    "OUT/loss_curve.json (+ .png), OUT/train_log.jsonl and OUT/checkpoint (--resume continues).",
    )
    p.add_argument("--base", default="compact", help="preset or checkpoint folder of the base (default: compact)")
    p.add_argument("--weights", help="checkpoint folder/URL with model.safetensors for the preset")
    p.add_argument("--data", required=True, help="folder or URL holding index.csv (identity,path,split) and the photos")
    p.add_argument("--split", default="train", help="split of index.csv to train on (bench is refused)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, help="optimisation steps (default 600)")
    p.add_argument("--people-per-step", type=int, help="people per step (default 8)")
    p.add_argument("--targets-per-person", type=int, help="degraded targets per person per step (default 1)")
    p.add_argument("--photos-per-person", type=int, help="photos drawn per person per step (default 3)")
    p.add_argument("--lr", type=float, help="AdamW learning rate of projections and token (default 1e-3)")
    p.add_argument("--alpha-lr", type=float, help="AdamW learning rate of the gates alpha (default 1e-2)")
    p.add_argument("--lambda-gen", type=float, help="weight of L_gen (default: personalization's)")
    p.add_argument("--probe-people", type=int, help="people held out for the probe (default 16; at most a tenth)")
    p.add_argument("--probe-every", type=int, help="probe every N steps (default 50)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default 50)")
    p.add_argument("--log-every", type=int, help="log line every N steps (default 10)")
    p.add_argument("--limit-people", type=int, help="train on a seeded subset of this many people")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.set_defaults(func=_cmd)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.train_prior``: the command without the ``pfstorer`` front end."""
    from pfstorer.cli import EXIT_USER_ERROR
    from pfstorer.errors import PFStorerError

    parser = argparse.ArgumentParser(prog="pfstorer")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train-prior", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except PFStorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
