"""Every command that README.md, docs/, bench/README.md and the config docstrings give runs as
written: its program knows every flag, its config resolves with every ``--config.a.b=value``
override (as ``--config`` does, in a fresh flag set), the model builds from it, and a
command that loads weights loads a file of that architecture with random weights, made here
by torchvision or MMDetection.

Placeholders are filled the way a reader fills them: ``root=DIR`` / ``PATH`` with the
raccoon photos (``../shared/data``), a COCO-format custom config's JSON files with small
ones written here, ``CONFIG`` and ``configs/<model>.py`` with the SSD300 config. Shell
variables a document defines (``SSD="--config ..."``) are expanded.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

import jdet
from jdet.data import builder

ROOT = Path(__file__).resolve().parents[1]
RACCOON = ROOT.parent / "shared" / "data" / "raccoon"
SOURCES = (["README.md", "bench/README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
           + sorted(f"configs/{p.name}" for p in (ROOT / "configs").glob("*.py")))
# The programs whose commands carry a config, by how a command names them.
PROGRAMS = {"train.py": "train.py", "eval.py": "eval.py", "predict.py": "predict.py",
            "-m jdet.inference.export": "jdet/inference/export.py"}
COMMAND = re.compile(r"python +(train\.py|eval\.py|predict\.py|-m jdet\.inference\.export)\b"
                     r"([^`\n]*)")
WEIGHT_FLAGS = ("--config.init.weights", "--config.init.backbone", "--weights")


def _text(source: str) -> str:
  text = (ROOT / source).read_text(encoding="utf-8")
  if source.endswith(".py"):  # the module docstring
    text = ast.get_docstring(ast.parse(text)) or ""
  text = re.sub(r"\\\s*\n\s*", " ", text)  # continued lines
  text = re.sub(r" \\ ", " ", text)  # a continuation written inside a docstring
  for name, value in re.findall(r'^(\w+)="([^"]*)"', text, re.M):  # VAR="..." then $VAR
    text = text.replace(f"${name}", value)
  return text


def documented_commands() -> list[tuple[str, str, str]]:
  """``(source, program, arguments)`` of every documented command of the programs."""
  found = []
  for source in SOURCES:
    for program, rest in COMMAND.findall(_text(source)):
      rest = rest.split(" #")[0].split("...")[0].strip()
      if rest.startswith("-"):  # a command, not the program named in a sentence
        found.append((source, program, rest))
  return found


COMMANDS = documented_commands()


def _program_flags(program: str) -> set[str]:
  """The flags a program defines: its own ``DEFINE_*`` calls and :func:`jdet.cli.define_flags`."""
  source = (ROOT / PROGRAMS[program]).read_text(encoding="utf-8")
  names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
  assert "cli.define_flags(" in source, f"{program} defines its flags without jdet.cli"
  names |= {"config", "workdir", "verbosity", "v", "help", "helpfull"}
  # define_flags's switches (a program calls it once).
  if "step=True" in source:
    names.add("step")
  if "weights=True" in source:
    names.add("weights")
  if "distributed=False" not in source:
    names |= {"distributed", "coordinator_address", "num_processes", "process_id"}
  return names


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory) -> dict[str, str]:
  """Small COCO-format files of two raccoon photos, for the custom COCO configs."""
  folder = tmp_path_factory.mktemp("coco_custom")
  from jdet.data.voc import VocSource
  gt = VocSource(RACCOON, "train").coco_ground_truth()
  keep = gt["images"][:2]
  ids = {im["id"] for im in keep}
  gt = dict(gt, images=keep, annotations=[a for a in gt["annotations"] if a["image_id"] in ids])
  for split in ("train", "val"):
    (folder / f"{split}.json").write_text(json.dumps(gt))
  return dict(train=str(folder / "train.json"), val=str(folder / "val.json"),
              images=str(RACCOON / "JPEGImages"))


def _fill(arguments: str, coco: dict[str, str]) -> list[str]:
  """The command's arguments with the placeholders filled (see the module doc)."""
  text = re.sub(r"root=(DIR|PATH)\b", f"root={RACCOON}", arguments)
  text = text.replace("root=../shared/data/raccoon", f"root={RACCOON}")
  text = text.replace("configs/<model>.py", "configs/ssd300.py").replace(" CONFIG ", " configs/ssd300.py:shapes ")
  args = shlex.split(text)
  out = []
  for a in args:
    if "format=coco" in a:
      a = re.sub(r"train=[^,]+", f"train={coco['train']}", a)
      a = re.sub(r"val=[^,]+", f"val={coco['val']}", a)
      a = re.sub(r"images=[^,\s]+", f"images={coco['images']}", a)
      a = a.replace(", ", ",")
    out.append(a)
  return out


def _split(args: list[str]) -> tuple[str | None, list[str], dict[str, str]]:
  """``(config spec, its overrides, the other flags)`` of a command's arguments."""
  spec, overrides, other = None, [], {}
  it = iter(range(len(args)))
  for i in it:
    a = args[i]
    if not a.startswith("--"):
      continue
    name, eq, value = a[2:].partition("=")
    if not eq and i + 1 < len(args) and not args[i + 1].startswith("-") and name in (
        "config", "workdir", "weights", "step", "out", "score_threshold", "split", "batch_size"):
      value = args[i + 1]
      next(it, None)
    if name == "config":
      spec = value
    elif name.startswith("config."):
      overrides.append(a if eq else f"--{name}={value}")
    else:
      other[name] = value
  return spec, overrides, other


def resolve(spec: str, overrides: list[str]):
  """The config ``--config=spec`` and the overrides give, parsed as the programs parse them."""
  builder.put_configs_on_path()
  argv = ["prog", f"--config={spec}", *overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


def test_the_commands_are_found():
  sources = {s for s, _, _ in COMMANDS}
  assert {"README.md", "docs/custom_data.md", "docs/raccoon.md", "docs/model_zoo.md",
          "configs/ssd300.py", "configs/sparse_rcnn.py"} <= sources
  assert len(COMMANDS) >= 40


@pytest.mark.parametrize("source, program, arguments", COMMANDS,
                         ids=[f"{s}:{p}:{i}" for i, (s, p, _) in enumerate(COMMANDS)])
def test_documented_command(source, program, arguments, coco_files):
  args = _fill(arguments, coco_files)
  spec, overrides, other = _split(args)
  unknown = set(other) - _program_flags(program)
  assert not unknown, f"{source}: {program} has no flag {sorted(unknown)}"
  if spec is None:  # the run's saved config (eval.py / predict.py --workdir)
    assert program in ("eval.py", "predict.py", "-m jdet.inference.export") and "workdir" in other
    return
  config = resolve(spec, overrides)
  model = jdet.build_model(config.model_name, **config.model)
  assert model.num_classes == config.model.num_classes


def test_resolving_refuses_an_override_of_no_field():
  """The check itself: the line the docs once gave for a field the config lacked."""
  with pytest.raises(AttributeError, match="norm_epsx"):
    resolve("configs/faster_rcnn_r50_fpn.py:coco", ["--config.model.norm_epsx=0"])
  assert resolve("configs/faster_rcnn_r50_fpn.py:coco",
                 ["--config.model.norm_eps=0"]).model.norm_eps == 0


# ----------------------------------------------------------------------------
# The commands that load weights: a file of the same architecture, random weights.
# ----------------------------------------------------------------------------


def _weights_commands():
  out = []
  for source, program, arguments in COMMANDS:
    if any(f in arguments for f in WEIGHT_FLAGS):
      out.append((source, program, arguments))
  return out


def _reference_file(name: str, folder: Path) -> Path:
  """A checkpoint named like ``name`` (torchvision or MMDetection's published file), with
  random weights of that architecture, written by torchvision or MMDetection."""
  import torch
  import torchvision
  path = folder / name
  if path.exists():
    return path
  torch.manual_seed(0)
  if name.startswith("ssd300_vgg16"):
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None)
  elif name.startswith("fasterrcnn"):
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None,
                                                                 weights_backbone=None)
  elif name.startswith("resnet50"):
    model = torchvision.models.resnet50(weights=None)
  elif name.startswith("resnet101"):
    model = torchvision.models.resnet101(weights=None)
  elif name.startswith("sparse"):
    from tests.oracles import mmdet_sparse_rcnn
    if not mmdet_sparse_rcnn.available():
      pytest.fail("MMDetection (the test extra) is needed for the Sparse R-CNN weights")
    model = mmdet_sparse_rcnn.build(num_classes=80)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return path
  else:
    raise AssertionError(f"no architecture known for the documented file {name}")
  torch.save(model.state_dict(), path)
  return path


WEIGHTS_COMMANDS = _weights_commands()


@pytest.mark.slow
@pytest.mark.parametrize("source, program, arguments", WEIGHTS_COMMANDS,
                         ids=[f"{s}:{p}" for s, p, _ in WEIGHTS_COMMANDS])
def test_documented_weights_load(source, program, arguments, coco_files, tmp_path_factory):
  import jax

  from jdet import convert
  from jdet.engine.restore import load_initial_weights
  folder = tmp_path_factory.getbasetemp() / "documented_weights"
  folder.mkdir(exist_ok=True)
  args = _fill(arguments, coco_files)
  spec, overrides, other = _split(args)
  if spec is None:
    pytest.fail(f"{source}: a weights command without --config")
  files = {}
  kept = []
  for o in overrides:
    name, _, value = o[2:].partition("=")
    if name in ("config.init.weights", "config.init.backbone"):
      files[name.split(".")[-1]] = value
    else:
      kept.append(o)
  if "weights" in other:
    files["weights"] = other["weights"]
  config = resolve(spec, kept)
  model = jdet.build_model(config.model_name, **config.model)
  size = config.data.transforms.get("size", 64) if "transforms" in config.data else 64
  image = jax.numpy.zeros((1, 128, 128, 3)) if not isinstance(size, int) else \
      jax.numpy.zeros((1, size, size, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, image), jax.random.key(0))
  # A value no random file holds: a leaf still at it was not loaded.
  variables = jax.tree.map(lambda s: jax.numpy.full(s.shape, 0.123, s.dtype), shapes)
  init = {k: str(_reference_file(Path(v).name, folder)) for k, v in files.items()}
  if "weights" in other:  # --weights: every variable from the file
    loaded, report = convert.load_model_variables(init["weights"], variables,
                                                  return_report=True)
    assert not report.reinitialised, report.summary()
  else:
    loaded = load_initial_weights(variables, type("Init", (), dict(
        weights=init.get("weights", ""), backbone=init.get("backbone", "")))())
  changed = {jax.tree_util.keystr(p): bool((a != b).any()) for (p, a), b in zip(
      jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(variables))}
  if set(files) == {"backbone"}:  # ImageNet weights: the backbone's, and nothing else
    body = {k: v for k, v in changed.items() if "'backbone'" in k}
    assert body and sum(body.values()) >= 0.9 * len(body), f"{source}: {files} left the body"
    assert not any(v for k, v in changed.items() if k not in body), source
  else:  # a whole model
    assert sum(changed.values()) >= 0.9 * len(changed), f"{source}: little of {files} loaded"
