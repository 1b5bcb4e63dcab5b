"""What a restore can be asked for: one model, read by the CLI, the Python API, HTTP and batch restore.

Its defaults are the ``restore`` section of :class:`pfstorer.settings.Settings`, so a config file
or ``PFSTORER_RESTORE__<FIELD>`` changes them everywhere at once. ``None`` means "the base's own
sampling default" (:class:`pfstorer.presets.SamplingDefaults`), which differs per preset.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ParameterError

__all__ = ["MAX_SCALE", "MAX_T", "ColorFix", "RestoreOptions", "Sampler", "add_restore_arguments"]

#: The diffusion schedule's length: steps and ``t_start`` never exceed it.
MAX_T = 1000
#: Largest upscaling factor: beyond it a 4096 px photo would need a 32k px output.
MAX_SCALE = 8.0

ColorFix = Literal["wavelet", "adain", "none"]
Sampler = Literal["ddim", "ddpm"]


class RestoreOptions(BaseModel):
    """How to restore one photo (besides which adapter): the same fields on every surface."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float = Field(1.0, gt=0, le=MAX_SCALE, description="Upscaling factor (super-resolution).")
    steps: int | None = Field(None, ge=1, le=MAX_T, description="Denoising steps.")
    sampler: Sampler | None = Field(None, description="Diffusion sampler.")
    t_start: int | None = Field(
        None, ge=1, le=MAX_T,
        description="Timestep sampling starts from: below the schedule's length (1000) the LQ diffused "
        "to it, at 1000 pure noise.",
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Noise seed; the same seed gives the same output.")
    strength: float = Field(
        1.0, ge=0, le=1, description="How much of the person's adapter to apply (scales its gates alpha): "
        "0 is the base model bit for bit, 1 the adapter as trained.",
    )
    tile: int | None = Field(None, ge=1, description="Tile size in output pixels (unset: the model's native size).")
    overlap: int | None = Field(None, ge=0, description="Tile overlap in output pixels (unset: the base's fraction of the tile).")
    color_fix: ColorFix | None = Field(None, description="Match the input's colours after stitching the tiles.")

    @classmethod
    def merged(cls, base: RestoreOptions | None = None, **given: Any) -> RestoreOptions:
        """``base`` (default: the built-in defaults) with the fields in ``given`` replaced, checked:
        an out-of-range value is a :class:`~pfstorer.errors.ParameterError` naming the field."""
        try:
            return cls(**{**(base or cls()).model_dump(), **given})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "options"
            raise ParameterError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`pfstorer.sampling.restore_batch` (all but the seed, which is per row)."""
        return self.model_dump(exclude={"seed"})

    @classmethod
    def from_args(cls, args: argparse.Namespace, defaults: RestoreOptions | None = None) -> RestoreOptions:
        """The options a command line gave (see :func:`add_restore_arguments`); unset flags keep ``defaults``."""
        given = {k: getattr(args, k) for k in cls.model_fields if getattr(args, k, None) is not None}
        return cls.merged(defaults, **given)


def add_restore_arguments(
    parser: argparse.ArgumentParser, defaults: RestoreOptions, *, omit: tuple[str, ...] = ()
) -> None:
    """One ``--flag`` per :class:`RestoreOptions` field, help from its description.

    Flags default to ``None`` (read back with :meth:`RestoreOptions.from_args`), so ``--help``
    shows the effective default from settings and an unset flag keeps it.
    """
    for name, field in RestoreOptions.model_fields.items():
        if name in omit:
            continue
        kind, choices = _argparse_type(field.annotation)
        default = getattr(defaults, name)
        shown = _UNSET.get(name, "the base's") if default is None else default
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, choices=choices, default=None,
            help=f"{field.description[:1].lower()}{field.description[1:]} [default: {shown}]".replace("%", "%%"),
        )


_UNSET = {"tile": "the model's native size", "overlap": "the base's fraction of the tile"}


def _argparse_type(annotation: Any) -> tuple[type, list[str] | None]:
    inner = annotation
    if typing.get_origin(annotation) is not Literal:  # Optional[X]: X
        inner = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if typing.get_origin(inner) is Literal:
        return str, list(typing.get_args(inner))
    return inner, None
