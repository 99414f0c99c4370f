"""Exception classes for errors that torch signals with a different class than pyengine once did.

pyengine's Python layer raised ValueError for bad arguments. Where torch raises RuntimeError (or
TypeError) for the same mistake, these classes are both: code written for torch (`except
RuntimeError`) and code written for earlier pyengine (`except ValueError`) catch the error alike.
The compiled operators follow torch's classes directly (csrc/common/checks.h).
"""


class ValueAndRuntimeError(ValueError, RuntimeError):
    """A bad argument for which torch raises RuntimeError."""


class ValueAndTypeError(ValueError, TypeError):
    """An argument of the wrong type, for which torch raises TypeError."""
