"""Many photos in one command: which image files the inputs name, where each result goes, and a
run over them that reports a photo that fails and goes on with the others.

``pfstorer restore`` and ``pfstorer degrade`` share this module, so both read their inputs and
name their outputs the same way; what is done to each photo stays with the caller. Starting a
process costs far more than restoring a small photo, so a folder of photos is one command.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import InputError, PFStorerError
from .image_checks import IMAGE_EXTENSIONS, is_url
from .images import OUTPUT_FORMATS, list_images, output_format

__all__ = [
    "DEFAULT_EXT",
    "Batch",
    "Item",
    "expand_inputs",
    "is_pattern",
    "output_exists",
    "plan_batch",
    "run_batch",
    "run_single",
]

DEFAULT_EXT = "png"
"""Output file type in a folder when ``--ext`` is not given (lossless)."""

PHOTO_FAILURES: tuple[type[BaseException], ...] = (PFStorerError, OSError, MemoryError, torch.OutOfMemoryError)
"""What fails one photo of a batch and lets the others go on: the user's input (unreadable, too
large), the disk (full, no permission), memory (a photo too large for the GPU). Anything else is
a bug and stops the run with its traceback."""


@dataclass(frozen=True)
class Item:
    """One photo of a run: read from ``source``, written to ``dest``."""

    source: str
    dest: str


@dataclass(frozen=True)
class Batch:
    """What one command was asked to do: the photos in order, and whether they are a batch
    (several inputs, a folder or a pattern: ``--out`` is then a folder and failures do not stop
    the run) or one photo handled as always (every problem is a user error)."""

    items: list[Item]
    many: bool
    out: str

    def pending(self, skip_existing: bool) -> list[Item]:
        """The items still to do: all of them, or with ``skip_existing`` those without an output."""
        return [it for it in self.items if not (skip_existing and output_exists(it.dest))]


def is_pattern(spec: str) -> bool:
    """Whether ``spec`` is a glob for us to expand (a quoted ``*.jpg`` reaches us unexpanded)
    rather than a path; a file whose name really holds ``*`` or ``[`` is taken as spelt."""
    return not is_url(spec) and glob.has_magic(spec) and not os.path.exists(spec)


def _is_dir(spec: str) -> bool:
    if not is_url(spec):
        return os.path.isdir(spec)
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec)
    return fs.isdir(path)


def _has_image_ext(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def expand_inputs(specs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The image files that files, folders (the images inside, sorted) and globs (expanded here,
    sorted, image files only) name, in the order given, each file once.

    A name that matches nothing, or a folder without images, is an error before any work, so a
    typo fails at once instead of restoring nothing.
    """
    out: list[str] = []
    seen: set[str] = set()
    for raw in specs:
        spec = os.fspath(raw)
        if is_pattern(spec):
            found = [p for p in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(p) and _has_image_ext(p)]
            if not found:
                raise InputError(f"{spec}: no image file matches")
        else:
            found = list_images([spec])  # a missing path is its error
            if not found:
                raise InputError(f"{spec}: no image files in this folder")
        for path in found:
            key = path if is_url(path) else os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def _normal_ext(ext: str) -> str:
    e = ext.lower().lstrip(".")
    if f".{e}" not in OUTPUT_FORMATS:
        names = ", ".join(k.lstrip(".") for k in OUTPUT_FORMATS)
        raise InputError(f"--ext {ext}: cannot write that type; use one of {names}")
    return e


def _is_out_folder(out: str) -> bool:
    """An existing folder, or a name ending in a slash: the output is named after the input."""
    return out.endswith(("/", os.sep)) or _is_dir(out)


def _stem(source: str) -> str:
    return os.path.splitext(os.path.basename(source.rstrip("/")))[0]


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else os.path.join(folder, name)


def plan_batch(
    specs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, suffix: str | None = None,
    ext: str | None = None,
) -> Batch:
    """Match inputs to outputs: ``<out>/<input stem><suffix>.<ext>`` in a folder, or ``out`` itself
    for one input file and an ``out`` that is a file name (as ``pfstorer restore`` always did).

    Refused before any work: an output file name for several inputs, two inputs that would write
    the same output, an output that would overwrite its input.
    """
    out = os.fspath(out)
    specs = [os.fspath(s) for s in specs]
    many = len(specs) != 1 or is_pattern(specs[0]) or _is_dir(specs[0])
    if not many and not _is_out_folder(out):  # one photo to one named file: the old behaviour
        if suffix is not None or ext is not None:
            raise InputError(f"--suffix and --ext name files in an output folder, but --out {out} is a file name")
        output_format(out)  # a name we cannot write is refused before any work
        return Batch([Item(specs[0], out)], many=False, out=out)
    e = _normal_ext(ext if ext is not None else DEFAULT_EXT)
    if many:
        if not is_url(out) and os.path.isfile(out):
            raise InputError(f"--out {out} is a file; with several inputs (or a folder or pattern) it must be a folder")
        if os.path.splitext(out.rstrip("/"))[1].lower() in OUTPUT_FORMATS:
            raise InputError(f"--out {out} looks like an image file name; with several inputs (or a folder or "
                             "pattern) --out is the folder the outputs are written to")
    sources = expand_inputs(specs)
    items = [Item(src, _join(out, f"{_stem(src)}{suffix or ''}.{e}")) for src in sources]
    writers: dict[str, str] = {}
    inputs = {src if is_url(src) else os.path.realpath(src) for src in sources}
    for it in items:
        key = it.dest if is_url(it.dest) else os.path.realpath(it.dest)
        if key in writers:
            raise InputError(f"{writers[key]} and {it.source} would both be written to {it.dest}; "
                             "rename one or run them separately")
        if key in inputs:
            raise InputError(f"{it.dest} would overwrite an input; choose another --out, --suffix or --ext")
        writers[key] = it.source
    return Batch(items, many=many, out=out)


def output_exists(dest: str) -> bool:
    """Whether ``dest`` (a path or fsspec URL) is already there (what ``--skip-existing`` skips)."""
    if not is_url(dest):
        return os.path.isfile(dest)
    import fsspec

    fs, path = fsspec.core.url_to_fs(dest)
    return fs.exists(path)


def _reason(exc: BaseException, source: str) -> str:
    """The message without the file name it starts with (the report names the file first)."""
    msg = str(exc) or type(exc).__name__
    for lead in (f"{source}: ", f"{source} is ", f"{source} "):
        if msg.startswith(lead):
            return msg[len(lead):]
    return msg


def run_batch(
    batch: Batch, todo: Sequence[Item], work: Callable[[Item], str], *, desc: str, quiet: bool = False
) -> int:
    """Do ``work`` on each item of ``todo`` (it returns the line to print), under a progress bar
    in photos/s on stderr. A photo that fails prints ``error: <path>: <reason>`` and the run goes
    on; a summary ends the run. The exit code: 0, or 1 when any photo failed."""
    from tqdm.auto import tqdm

    failed: list[tuple[str, str]] = []
    start = time.perf_counter()
    with tqdm(total=len(todo), desc=desc, unit="photo", disable=quiet or not todo, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for item in todo:
            try:
                line = work(item)
            except PHOTO_FAILURES as exc:
                failed.append((item.source, _reason(exc, item.source)))
                tqdm.write(f"error: {item.source}: {failed[-1][1]}", file=sys.stderr)
            else:
                tqdm.write(line, file=sys.stdout)
            bar.update(1)
    seconds = time.perf_counter() - start
    done = len(todo) - len(failed)
    skipped = len(batch.items) - len(todo)
    rate = f", {done / seconds:.2f} photos/s" if done and seconds > 0 else ""
    extra = f"; {skipped} skipped, their output exists" if skipped else ""
    print(f"{desc}: {done} of {len(batch.items)} photos -> {batch.out} in {seconds:.1f} s{rate}{extra}")
    if failed:
        print(f"{len(failed)} of {len(batch.items)} photos failed:", file=sys.stderr)
        for source, reason in failed:
            print(f"error: {source}: {reason}", file=sys.stderr)
        return 1
    return 0


def run_single(batch: Batch, todo: Sequence[Item], work: Callable[[Item], str]) -> int:
    """One photo, as the commands always did: any problem is raised (a one-line error, exit code
    2); with ``--skip-existing`` an output already there is left alone."""
    if not todo:
        item = batch.items[0]
        print(f"skipped {item.source}: {item.dest} exists")
        return 0
    print(work(todo[0]))
    return 0
