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
