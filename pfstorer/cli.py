"""``pfstorer`` command line: personalize, restore, degrade and evaluate on one machine, plus the
commands that other packages register (manifests, runs on Ray, serving, the demo) through the
``pfstorer.cli`` entry-point group, so that ``pfstorer`` itself never imports Ray.

Building the parser imports no torch, Ray or MLflow: each command's handler is imported when it
runs (:func:`lazy`), so ``pfstorer --help`` answers at once. A command whose optional part is
missing is still listed and says what to install.

User errors print one line and exit with code 2; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .errors import PFStorerError
from .restore_options import RestoreOptions, add_restore_arguments

EXIT_USER_ERROR = 2
METRIC_NAMES = ("psnr", "ssim", "st_lpips", "id_facenet", "id_dlib", "lmse", "sharpness", "id_refs_facenet",
                "id_refs_dlib", "niqe", "brisque")
"""What ``pfstorer evaluate --metrics`` accepts (the keys of :data:`pfstorer.metrics.METRICS`)."""

Handler = Callable[[argparse.Namespace], int]


def lazy(target: str, extra: str | None = None) -> Handler:
    """A handler ``"module:function"`` imported only when its command runs.

    An ImportError then (an optional dependency missing) is a one-line error naming ``extra``.
    """
    module, _, name = target.partition(":")

    def run(args: argparse.Namespace) -> int:
        try:
            fn = getattr(import_module(module), name)
        except ImportError as exc:
            hint = f"; install it with: pip install 'pfstorer[{extra}]'" if extra else ""
            raise PFStorerError(f"this command needs {exc.name or exc}, which is not installed{hint}") from None
        return int(fn(args) or 0)

    return run


def json_option(text: str | None, what: str) -> dict[str, Any] | None:
    """A ``--...-options '{"k": v}'`` value: a JSON object, or a one-line error naming the option."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PFStorerError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PFStorerError(f"{what} must be a JSON object")
    return value


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """While a ``--json`` command works, send everything printed to stdout to stderr instead
    (Ray's worker messages, libraries' prints, child processes), so that the JSON printed after
    the block is the only thing on stdout. ``active=False`` changes nothing."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _unavailable(reason: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        raise PFStorerError(f"this command is not available: {reason}")

    return run


def _add_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model: a preset (tiny, tiny-latent, compact, sd21) or a checkpoint "
                                  "folder/URL (default: settings base, i.e. $PFSTORER_BASE or compact)")
    p.add_argument("--weights", help="checkpoint folder/URL with model.safetensors for the preset "
                                     "(sd21; default: settings base_weights)")
    p.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:1 (default: settings device, auto)")


def _load_base(args: argparse.Namespace):
    """The base named on the command line, else the one of :class:`~pfstorer.settings.Settings`
    (config file, then ``PFSTORER_*`` environment): the same base as ``pfstorer serve`` and ``run``."""
    from .model import load_base
    from .settings import Settings

    s = Settings.load()
    return load_base(args.base or s.base, weights=args.weights or s.base_weights, device=args.device or s.device)


def cmd_personalize(args: argparse.Namespace) -> int:
    from .config import TrainingSpeed
    from .images import list_images, load_image
    from .settings import Settings
    from .training import PersonalizeConfig, PersonalizeJob, personalize_many

    paths = list_images(args.refs)
    given = {"steps": args.steps, "seed": args.seed, "lr": args.lr, "alpha_lr": args.alpha_lr,
             "lambda_gen": args.lambda_gen, "batch_size": args.batch_size, "gen_rows": args.gen_rows,
             "prior": "none" if args.no_prior else args.prior}
    base_config = Settings.load().personalize  # what `pfstorer run` would use: one source of defaults
    config = PersonalizeConfig(**(base_config.model_dump() | {k: v for k, v in given.items() if v is not None}))
    from .training import check_references

    refs = [load_image(p) for p in paths]
    check_references(refs, config)
    model = _load_base(args)
    identity = args.identity or Path(os.path.commonpath([os.path.abspath(p) for p in paths])).name or "person"
    job = PersonalizeJob(identity, refs, config.seed, args.tenant, [Path(p).name for p in paths])
    speed = TrainingSpeed(autocast_bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing)
    (adapter,) = personalize_many(model, [job], config=config, capacity=1, speed=speed, progress=not args.quiet)
    out = adapter.save(args.out)
    losses = ", ".join(f"{k}={v:.4g}" for k, v in adapter.metadata.final_losses.items())
    start = "the reference prior" if adapter.metadata.config.get("prior_sha256") else "zero"
    print(f"adapter for {identity!r} ({len(refs)} references, {adapter.metadata.steps} steps from {start}) -> {out}")
    print(f"losses: {losses}")
    return 0


def restore_defaults() -> RestoreOptions:
    """The ``restore`` section of settings (config file, environment) that restore flags default to.

    When settings do not load, ``--help`` still works with the built-in defaults; the command
    itself then reports what is wrong with them.
    """
    from .settings import Settings

    try:
        return Settings.load().restore
    except Exception:  # noqa: BLE001 - reported by the command that loads them
        return RestoreOptions()


def cmd_restore(args: argparse.Namespace) -> int:
    import torch

    from .adapter import Adapter
    from .batch_io import Item, plan_batch, run_batch, run_single
    from .images import check_quality, load_image, save_image
    from .sampling import restore
    from .settings import Settings

    batch = plan_batch(args.input, args.out, suffix=args.suffix, ext=args.ext)  # names refused before any work
    check_quality(args.quality)
    settings = Settings.load()
    options = RestoreOptions.from_args(args, settings.restore)
    image_limits = settings.limits.restores(max_pixels=args.max_pixels)

    def read(source: str) -> torch.Tensor:
        # uint8 end to end: a 4096 px photo costs 3 bytes a pixel, not 12, on the way in and out
        return load_image(source, limits=image_limits, dtype=torch.uint8)

    if args.threads:
        torch.set_num_threads(args.threads)
    todo = batch.pending(args.skip_existing)
    read_first: dict[str, torch.Tensor] = {}
    if not batch.many and todo:  # one photo: its problems are reported before the model loads
        read_first[todo[0].source] = read(todo[0].source)
    adapter = Adapter.load(args.adapter) if args.adapter else None
    if todo:  # once for every photo; not at all when every output is already there
        model = _load_base(args)
        if adapter is not None:
            adapter.check_base(model)
    who = f"with adapter {adapter.identity!r}" if adapter else "with the base model only"

    def restore_one(item: Item) -> str:
        image = read_first.pop(item.source, None)
        if image is None:
            image = read(item.source)
        out = restore(model, image, adapter=adapter, options=options,
                      progress=not (args.quiet or batch.many))  # a batch shows photos, not steps
        save_image(out, item.dest, quality=args.quality)
        return (f"restored {item.source} ({image.shape[2]}x{image.shape[1]}) {who} -> {item.dest} "
                f"({out.shape[2]}x{out.shape[1]})")

    if not batch.many:
        return run_single(batch, todo, restore_one)
    return run_batch(batch, todo, restore_one, desc="restore", quiet=args.quiet)


def cmd_degrade(args: argparse.Namespace) -> int:
    from .batch_io import Item, plan_batch, run_batch, run_single
    from .degradations import degrade
    from .images import load_image, save_image

    batch = plan_batch(args.input, args.out, suffix=args.suffix, ext=args.ext)

    def degrade_one(item: Item) -> str:
        save_image(degrade(load_image(item.source), args.level, args.seed), item.dest)
        return f"{args.level} degradation of {item.source} (seed {args.seed}) -> {item.dest}"

    todo = batch.pending(args.skip_existing)
    if not batch.many:
        return run_single(batch, todo, degrade_one)
    return run_batch(batch, todo, degrade_one, desc="degrade", quiet=args.quiet)


def _add_inputs_outputs(p: argparse.ArgumentParser, verb: str) -> None:
    """--input, --out, --suffix, --ext, --skip-existing: the same for every command that writes one
    image per photo it reads (see :mod:`pfstorer.batch_io`)."""
    p.add_argument("--input", required=True, nargs="+", action="extend", metavar="PATH",
                   help=f"photos to {verb}: image files, folders (the images inside, sorted) or glob patterns "
                        "such as 'scans/*.jpg' (quoted or not); several may follow --input, which may also be "
                        "repeated. Types: PNG, JPEG, WebP, AVIF, BMP, TIFF; HEIC with the heic extra")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="one input file: the output image (.png, .jpg/.jpeg or .webp), or an existing folder "
                        "(or a name ending in /) to write it into. Several inputs, a folder or a pattern: the "
                        "folder to write to (created), each output named after its input: photos/a.jpg -> "
                        "OUT/a<suffix>.<ext>")
    p.add_argument("--suffix", metavar="TEXT",
                   help="text added to each output's name in the --out folder: with _restored, photos/a.jpg "
                        "-> OUT/a_restored.png (default: none, OUT/a.png)")
    p.add_argument("--ext", metavar="EXT",
                   help="image type written in the --out folder: png (default, lossless), jpg/jpeg or webp")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave alone every input whose output already exists (resumes a stopped run)")


def cmd_info(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    if args.base is None:
        for name, cfg in PRESETS.items():
            s = cfg.sampling
            start = "noise" if s.t_start >= cfg.num_train_timesteps else f"LQ at t={s.t_start}"
            print(f"{name:12s} {cfg.space:6s} native {cfg.sample_size}px  {s.sampler} {s.steps} steps from {start}  "
                  f"licence: {cfg.license}")
        return 0
    model = _load_base(args)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"preset": model.config.name, "fingerprint": model.fingerprint, "parameters": n,
                      "personalization_blocks": len(model.pb_blocks)}, indent=2))
    return 0


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """Every command; ``plugins=False`` leaves out those other packages register (see :func:`main`)."""
    from .config import PersonalizeConfig

    parser = argparse.ArgumentParser(
        prog="pfstorer",
        description="Personalized face restoration (PFStorer, CVPR 2024): learn a small adapter per person "
                    "from a few good photos, then restore any degraded photo of that person so it still "
                    "looks like them.",
        epilog="Quick start: pfstorer personalize --refs photos/anna/ --out adapters/anna && "
               "pfstorer restore --adapter adapters/anna --input blurry.jpg --out restored.png --scale 2",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("personalize", help="train one person's adapter from 3-20 reference photos",
                       description="Fine-tune a personalization adapter on a frozen base model from reference "
                                   "photos of one person (files or folders). The adapter folder holds "
                                   "adapter.safetensors + adapter.json and needs no photos to restore.")
    _add_base(p)
    p.add_argument("--refs", nargs="+", required=True, metavar="PATH", help="reference photos or folders of them")
    p.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="folder to write the adapter to")
    p.add_argument("--identity", help="name of the person (default: the references' folder name)")
    p.add_argument("--tenant", help="tenant that owns this person (recorded in the metadata)")
    d = PersonalizeConfig()
    note = "default: settings personalize."
    p.add_argument("--steps", type=int, help=f"optimisation steps (paper: 500; 0 = the starting adapter: the prior with the person's "
                        f"references, or, without one, the base itself; {note}steps, {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"LQ samples per step ({note}batch_size, {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"learning rate of the adapter's projections and token ({note}lr, {d.lr:g})")
    p.add_argument("--alpha-lr", type=float, help=f"learning rate of the gates alpha ({note}alpha_lr, {d.alpha_lr:g})")
    p.add_argument("--lambda-gen", type=float,
                   help=f"weight of the generative regulariser (paper: 0.1; {note}lambda_gen, {d.lambda_gen:g})")
    p.add_argument("--gen-rows", type=int, help=f"of each step's samples, how many also estimate the generative "
                   f"regulariser (paper: all; {note}gen_rows, {d.gen_rows})")
    p.add_argument("--seed", type=int, help=f"seed of every random choice (same seed, same adapter; {note}seed, {d.seed})")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--prior", metavar="PRIOR_FILE",
                       help="start the adapter from this reference prior (prior.safetensors of this base; "
                            f"default: {note}prior, {d.prior!r}: the base's own prior when it ships one)")
    start.add_argument("--no-prior", action="store_true",
                       help="start from zero (random projections, alpha = 0) even where the base has a prior")
    p.add_argument("--bf16", action="store_true", help="run the frozen base under bf16 autocast (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet blocks in backward: less memory, slower")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_personalize)

    p = sub.add_parser("restore", help="restore (and optionally upscale) photos: one, a folder, a pattern",
                       description="Restore degraded photos with the base model, or with a person's adapter. "
                                   "Images of any size are restored in overlapping tiles; --scale upsamples "
                                   "first (super-resolution). The same seed gives the same PNG, whether a photo "
                                   "is restored alone or in a batch. Several photos (files, folders, patterns) "
                                   "are restored in one process: the model and adapter load once, and a "
                                   "progress bar counts photos. In a batch a photo that fails (unreadable, too "
                                   "large) prints 'error: PATH: reason' and the others go on; the exit status "
                                   "is then 1. A problem with the command itself, or with a single photo, "
                                   "prints one 'error:' line and exits with status 2.",
                       epilog="Examples: pfstorer restore --input blurry.jpg --out restored.png; "
                              "pfstorer restore --adapter adapters/anna --input scans/ 'old/*.jpg' extra.png "
                              "--out restored/ --suffix _r --ext webp --skip-existing")
    _add_base(p)
    _add_inputs_outputs(p, "restore")
    p.add_argument("--quality", type=int, default=92, help="JPEG/WebP quality, 1..100")
    p.add_argument("--adapter", metavar="ADAPTER_DIR", help="the person's adapter (none: base model only)")
    add_restore_arguments(p, restore_defaults())
    p.add_argument("--max-pixels", type=int,
                   help="refuse larger inputs (default: settings limits.max_image_pixels, 4096 x 4096)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (default: all cores). Outputs are bit for bit the server's for the "
                        "same image, seed and settings at the server's thread count (a replica uses "
                        "floor(serve.num_cpus), /readyz says torch_threads); another count may change a few "
                        "pixels by one level (float sums in another order)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("degrade", help="synthesize low-quality versions of photos",
                       description="Apply the light or heavy synthetic degradation (blur, resize, noise, JPEG, "
                                   "twice) used for training and benchmarks. Seeded and reproducible: the same "
                                   "seed gives the same output for a photo, alone or in a batch. Takes files, "
                                   "folders and patterns like restore; in a batch a photo that fails is "
                                   "reported and the others go on (exit status 1).")
    _add_inputs_outputs(p, "degrade")
    p.add_argument("--level", choices=["light", "heavy"], default="heavy", help="how much damage")
    p.add_argument("--seed", type=int, default=0, help="seed of the random degradation (the same for every photo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_degrade)

    p = sub.add_parser("info", help="list base presets, or show one base's fingerprint",
                       description="Without --base: the presets. With --base: parameter count, fingerprint "
                                   "(hash of config + weights) and number of personalization blocks.")
    p.add_argument("--base", default=None, help="preset or checkpoint to inspect")
    p.add_argument("--weights")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_info)

    _add_evaluate(sub)
    if not plugins:
        return parser
    for ep in sorted(entry_points(group="pfstorer.cli"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional part of the install is missing: say so, do not hide it
            reason = f"{ep.value} cannot be imported ({exc})"
            sub.add_parser(ep.name, help=f"unavailable: {reason}").set_defaults(func=_unavailable(reason))
            continue
        register(sub)
    return parser


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score restored faces against ground truth (tables + comparison grid)",
        description="Pair each restored image in --pred with the ground-truth image of the same name (extension "
                    "ignored) in --gt, compute PSNR, SSIM, ST-LPIPS, identity cosine (FaceNet, dlib), landmark MSE, "
                    "NIQE and BRISQUE, and write metrics.md, metrics.json, metrics.csv and grid.png to --out. "
                    "Metrics whose optional model is not installed are reported as n/a with the reason.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of restored images")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth images, same file names")
    p.add_argument("--refs", metavar="DIR", default=None,
                   help="folder of reference photos of the person: adds ID-refs, the mean identity cosine to them")
    p.add_argument("--input", metavar="DIR", default=None,
                   help="folder of the degraded inputs, same file names: shown as the grid's first column")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the tables and grid.png")
    p.add_argument("--metrics", default=None, metavar="LIST",
                   help=f"comma-separated subset of: {', '.join(METRIC_NAMES)} (default: all the inputs allow)")
    p.add_argument("--grid-rows", type=int, default=32, metavar="N", help="images shown in grid.png (0: no grid)")
    p.set_defaults(func=lazy("pfstorer.evaluate:run_cli", extra="eval"))


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A built-in command (restore, degrade, ...) needs none of the commands other packages register:
    # leaving them out keeps their imports and the entry-point scan off every start-up of those.
    parser = build_parser(plugins=False)
    if next((a for a in argv if not a.startswith("-")), None) not in _commands(parser):
        parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PFStorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
