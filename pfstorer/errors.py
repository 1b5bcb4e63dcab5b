"""User-facing errors.

Every problem a user can cause (a bad file, too few references, an adapter for another base) is a
:class:`PFStorerError` with a one-line message. The CLI prints it and exits with code 2; the HTTP
API maps it to a 4xx answer through ``status``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PFStorerError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    status: int = 400  # HTTP status the serving layer answers with

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class InputError(PFStorerError):
    """An image or argument we cannot use (unreadable, wrong type, too small)."""


class UnsupportedMediaError(InputError):
    """A file that is not one of the accepted image types."""

    status = 415


class ParameterError(InputError):
    """A parameter outside what this server or command allows (more steps than its limit)."""

    status = 422


class TooSmallError(InputError):
    """An image, or a requested output, with a side under the minimum a restore can use."""

    status = 422


class TooLargeError(InputError):
    """An image over the byte or pixel limits (refused before decoding where possible)."""

    status = 413


class ReferenceCountError(InputError):
    """Too few or too many reference photos for personalization."""


class AdapterError(PFStorerError):
    """A missing, corrupt or incompatible adapter artifact."""

    status = 422


class AdapterMismatchError(AdapterError):
    """An adapter trained on a different base model than the one loaded."""


class PriorError(AdapterError):
    """A missing or corrupt reference prior, or one whose blocks do not fit the base."""


class PriorMismatchError(PriorError):
    """A reference prior trained on a different base model than the one loaded."""


class WeightsUnavailableError(PFStorerError):
    """A preset whose weights are not on this machine (they are never downloaded)."""
