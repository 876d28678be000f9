"""The import rules of the layers (docs/design.md): a file imports only from the layers below it.

Each rule reads the imports of the tree with ``ast`` and is shown to catch a
planted import of the kind it refuses, so that a rule that silently sees
nothing fails too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DETECTORS = ("ssd", "refinedet", "faster_rcnn", "sparse_rcnn")
# What the pure maths and the models stand on: none of the layers above them.
UPPER = ("jdet.engine", "jdet.inference", "jdet.evaluation", "jdet.data", "jdet.convert",
         "jdet.cli", "jdet.viz")
LOWER = ("jdet/models", "jdet/ops", "jdet/assign", "jdet/boxes.py", "jdet/losses.py",
         "jdet/detections.py")


def imported_modules(source: str) -> set[str]:
  """Every module a source imports, and ``module.name`` for each ``from module import name``."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def imported_names(source: str) -> set[tuple[str, str]]:
  """``(module, name)`` for each ``from module import name``."""
  return {(node.module, a.name) for node in ast.walk(ast.parse(source))
          if isinstance(node, ast.ImportFrom) and node.module for a in node.names}


def _files(*where: str) -> list[pathlib.Path]:
  out = []
  for w in where:
    p = ROOT / w
    out += [p] if p.suffix == ".py" else sorted(p.rglob("*.py"))
  return out


def _refers(imported: set[str], prefix: str) -> bool:
  return any(m == prefix or m.startswith(prefix + ".") for m in imported)


def _offenders(files, refused) -> list[str]:
  """``path imports module`` for each file that imports a module ``refused(path)`` names."""
  out = []
  for path in files:
    imported = imported_modules(path.read_text(encoding="utf-8"))
    out += [f"{path.relative_to(ROOT)} imports {m}" for m in refused(path)
            if _refers(imported, m)]
  return out


def _detector_siblings(path: pathlib.Path) -> list[str]:
  rel = path.relative_to(ROOT)
  if rel.parts[:2] == ("jdet", "models") and rel.name == "__init__.py":
    return []  # the registry imports every detector
  return [f"jdet.models.{d}" for d in DETECTORS if rel != pathlib.Path("jdet/models", f"{d}.py")]


RULES = {
    # name: (files, refused modules of a file, a planted line the rule must catch)
    "no detector imports another; evaluation imports none": (
        lambda: _files("jdet"), _detector_siblings, ("jdet/models/refinedet.py",
                                                     "from jdet.models.ssd import SSD")),
    "the maths and the models import no layer above them": (
        lambda: _files(*LOWER), lambda p: UPPER, ("jdet/models/detector.py",
                                                 "from jdet.engine import training")),
    "a head imports no backbone": (
        lambda: _files("jdet/models/heads"), lambda p: ["jdet.models.backbones"],
        ("jdet/models/heads/ssd_head.py", "from jdet.models.backbones.vgg import VGG16")),
    "evaluation imports neither the engine nor the inference side": (
        lambda: _files("jdet/evaluation"), lambda p: ["jdet.engine", "jdet.inference"],
        ("jdet/evaluation/loop.py", "from jdet.engine import training")),
    "the inference side does not import the training loop": (
        lambda: _files("jdet/inference"),
        lambda p: ["jdet.engine.training", "jdet.engine.evaluate"],
        ("jdet/inference/predictor.py", "from jdet.engine import training")),
    "the engine does not import the inference side": (
        lambda: _files("jdet/engine"), lambda p: ["jdet.inference"],
        ("jdet/engine/training.py", "import jdet.inference.predictor")),
    "weight conversion reads no data pipeline": (
        lambda: _files("jdet/convert"), lambda p: ["jdet.data"],
        ("jdet/convert/torchvision.py", "from jdet.data.tfds import COCO_CATEGORY_IDS")),
    "the exported-model loader and its image reader stay light": (
        lambda: _files("jdet/inference/exported.py", "jdet/inference/images.py"),
        lambda p: ["flax", "optax", "orbax", "grain", "tensorflow_datasets", "jdet.models",
                   "jdet.data", "jdet.engine", "jdet.inference.predictor"],
        ("jdet/inference/exported.py", "import flax.linen as nn")),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_import_rule(rule):
  files, refused, (planted_in, planted) = RULES[rule]
  files = files()
  assert files, rule
  offenders = _offenders(files, refused)
  assert not offenders, offenders
  # The rule sees imports: a planted one in a file it covers is refused.
  path = ROOT / planted_in
  assert path in files
  imported = imported_modules(path.read_text(encoding="utf-8") + "\n" + planted + "\n")
  assert any(_refers(imported, m) for m in refused(path)), (rule, planted)


def test_bench_programs_share_only_the_harness_public_helpers():
  programs = sorted((ROOT / "bench").glob("*.py"))
  stems = {p.stem for p in programs}
  assert "harness" in stems and len(stems) > 2

  def problems(path: pathlib.Path, source: str) -> list[str]:
    out = [f"{path.name} imports bench program {m}"
           for m in imported_modules(source) if m.split(".")[0] in stems - {"harness", path.stem}
           or m.startswith("bench.") and m.split(".")[1] not in ("harness",)]
    out += [f"{path.name} imports private {module}.{name}" for module, name in imported_names(source)
            if module.split(".")[-1] == "harness" and name.startswith("_")]
    return out

  found = [p for path in programs for p in problems(path, path.read_text(encoding="utf-8"))]
  assert not found, found
  # Both kinds are caught.
  ssd = ROOT / "bench" / "faster_rcnn.py"
  assert problems(ssd, "from ssd import torch_train\n")
  assert problems(ssd, "from harness import _median_time\n")
