"""The programs' log levels (:mod:`jdet.engine.logs`): jdet's INFO and every warning by
default, the libraries' INFO lines only with ``--verbosity=0``."""

from __future__ import annotations

import logging

import pytest

from jdet.engine import logs


@pytest.fixture
def restore_levels():
  names = ("", "jdet", "absl")
  before = {n: logging.getLogger(n).level for n in names}
  yield
  for n, level in before.items():
    logging.getLogger(n).setLevel(level)


@pytest.mark.parametrize("verbosity, library_info, jdet_info, warnings", [
    (None, False, True, True),  # the default: --verbosity not given
    (-1, False, True, True),
    (0, True, True, True),
    (1, True, True, True),
    (-2, False, False, False),  # errors only
])
def test_levels(restore_levels, verbosity, library_info, jdet_info, warnings):
  logs.configure(verbosity)
  orbax = logging.getLogger("absl")  # where orbax's absl logging lands
  assert orbax.isEnabledFor(logging.INFO) == library_info
  assert logging.getLogger("jdet.engine.training").isEnabledFor(logging.INFO) == jdet_info
  assert orbax.isEnabledFor(logging.WARNING) == warnings
  assert logging.getLogger("jdet.engine.checkpoint").isEnabledFor(logging.WARNING) == warnings
  assert logging.getLogger("jdet.engine.checkpoint").isEnabledFor(logging.ERROR)
