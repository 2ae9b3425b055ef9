"""The exceptions oto_jax raises: one base class, one subclass per kind of failure.

Catch :class:`OTOError` to handle everything oto_jax refuses; each message names the problem
and what to do about it.
"""

from __future__ import annotations


class OTOError(Exception):
  """Base class of every error oto_jax raises on purpose."""


class AnalysisError(OTOError, ValueError):
  """The function or its inputs cannot be analysed (bad inputs, a failed trace)."""


class ShapeSpecificError(OTOError, ValueError):
  """A slim model was called at shapes its program does not cover.

  Raised when the analysed function could only be traced at fixed input shapes (its code
  branches on or hard-codes a batch size) and is called at others, or when an input's shape
  does not match the analysed signature.
  """


class SurgeryError(OTOError, RuntimeError):
  """An equation of the program could not be rewritten for the slim model."""


class NativeUnavailable(OTOError, NotImplementedError):
  """The slim model cannot be expressed as the user's own Flax module; use ``Subnet.apply``."""
