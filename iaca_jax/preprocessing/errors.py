"""The one error type of the preprocessing stage."""


class DataError(ValueError):
  """Raw input that the preprocessing stage cannot use.

  The message always names the offending file or folder. Raised for problems
  that must stop a build (a malformed annotation file, a missing validation
  crop folder, ...); problems that can be skipped are logged and counted in
  `BuildStats` instead.
  """


def reason(error: BaseException) -> str:
  """What an exception says, or its type when it says nothing (`OSError()`), so that a message
  quoting it never ends in an empty interpolation."""
  return str(error).strip() or type(error).__name__


def first_line(error: BaseException) -> str:
  """The first line of `reason(error)`, for messages quoting an error whose text runs to many lines
  (XLA's, Orbax's)."""
  return reason(error).splitlines()[0]
