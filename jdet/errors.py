"""Looking through an exception at what it was raised from.

Libraries wrap the errors jdet must recognise (orbax and tensorstore wrap a full
disk in a ``ValueError``; tfds wraps a missing TensorFlow):
:func:`exception_chain` walks an exception and its causes, each once.
"""

from __future__ import annotations

from typing import Iterator

__all__ = ["exception_chain"]


def exception_chain(error: BaseException | None) -> Iterator[BaseException]:
  """``error``, then the exception it was raised from (``__cause__``, else
  ``__context__``), and so on; each exception once, even in a cycle."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__
