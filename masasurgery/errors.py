"""The errors and warnings masasurgery raises.

Every error derives from :class:`MasaError`; the specific ones also derive from the
builtin that fits, so ``except ValueError`` keeps working in user code.
"""

from __future__ import annotations

__all__ = [
    "AlreadyConvertedError",
    "CaptureError",
    "ConversionMismatchError",
    "CheckpointError",
    "ConfigError",
    "FitError",
    "LayoutError",
    "MasaError",
    "MasaWarning",
    "ModelRunError",
    "NoAttentionError",
    "VerificationError",
]


class MasaError(Exception):
    """Base class of every error raised by masasurgery."""


class ConfigError(MasaError, ValueError):
    """An option passed by the user is out of range or of the wrong type."""


class CaptureError(MasaError, RuntimeError):
    """No capture path (fx, export, module structure) could read the model."""


class NoAttentionError(MasaError, ValueError):
    """The model has no attention blocks that can share a dictionary."""


class AlreadyConvertedError(MasaError, ValueError):
    """The model already holds masasurgery modules."""


class FitError(MasaError, ValueError):
    """The weights handed to a fitter do not form a valid stack."""


class LayoutError(MasaError, NotImplementedError):
    """A projection layout that the operation does not know or support yet."""


class CheckpointError(MasaError, ValueError):
    """A saved checkpoint or plan does not match the model, or is malformed."""


class ModelRunError(MasaError, RuntimeError):
    """The model itself failed on the example inputs during a masasurgery step."""


#: What a model raises when it cannot run an input (a wrong shape, type or
#: dtype), which masasurgery wraps in a ModelRunError naming the batch.
MODEL_FAILURES = (AssertionError, AttributeError, RuntimeError, TypeError, ValueError)


class ConversionMismatchError(MasaError, ValueError):
    """A conversion record was used with a model it does not describe, or after
    its original projections were released."""


class VerificationError(MasaError, AssertionError):
    """A converted model does not match its reference within tolerance."""


class MasaWarning(UserWarning):
    """Something the user should look at; the operation itself went on."""


def sentence(text: object) -> str:
    """``text`` as one sentence: stripped, ending in exactly one full stop.

    For quoting another library's message inside ours, so that ``"... (32)."``
    followed by ``". Check ..."`` does not read ``"(32).. Check"``.

    Example:
        >>> sentence("doesn't match model (32)."), sentence("bad shape ")
        ("doesn't match model (32).", 'bad shape.')
    """
    text = str(text).strip()
    return text if text.endswith((".", "!", "?")) else text + "."
