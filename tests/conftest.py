"""Shared pytest set-up: four simulated CPU devices and float32 everywhere."""

import os

# Simulated devices must be configured before JAX initialises its backends.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest


@pytest.fixture
def rng():
  """A NumPy generator with a fixed seed, fresh for each test."""
  return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_data_notes():
  """Each test starts with no pending skip/fix notes (they are per process, and a
  test worker runs many tests): what a test totals is what it caused."""
  from jdet.data import records
  records.drain_notes()
  yield
