"""The import graph points only down: families import the shared layer and themselves, never another family.

Layers, read from the folders (a new family or shared module needs no change here):

* ``zoo/<module>.py`` is the shared model layer; ``zoo/<family>/`` is a model family.
* ``datamodules/<module>.py`` (base, sampler, digits, cifar, ...) is the shared data layer; ``datamodules/<family>.py``
  or ``datamodules/<family>/`` is a data family, named as in ``zoo/``; ``datamodules/generated/`` holds the
  generated data sets, which only import the shared data layer.
* Models never import data modules: the batch a model reads is a documented contract, not an import.

Every ``import`` counts, also inside functions.
"""

import ast
from pathlib import Path

from conftest import ROOT


def _modules(package: Path) -> dict[str, Path]:
    """Dotted name → file of every module under ``package`` (``package/__init__.py`` included)."""
    return {".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in sorted(package.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Absolute dotted names imported by a file (``from a.b import c`` yields ``a.b`` and ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _layer(module: str, families: dict[str, set[str]]) -> tuple[str, str]:
    """``(tree, family)`` of a dotted module name: family ``""`` for the shared layer of ``zoo`` or ``datamodules``."""
    tree, *rest = module.split(".")
    return tree, (rest[0] if rest and rest[0] in families[tree] else "")


def import_violations(root: Path) -> list[str]:
    """Every import of ``root/zoo`` and ``root/datamodules`` that breaks the layering, as readable lines."""
    model_families = {p.name for p in (root / "zoo").iterdir() if (p / "__init__.py").exists()}
    families = {"zoo": model_families, "datamodules": model_families | {"generated"}}
    modules = {name: path for tree in ("zoo", "datamodules") for name, path in _modules(root / tree).items()}
    violations = []
    for name, path in modules.items():
        tree, family = _layer(name, families)
        for imported in sorted(_imports(path)):
            if imported not in modules:
                continue  # third-party, or the half of `from x import name` that names an object
            other_tree, other_family = _layer(imported, families)
            if tree == "zoo" and other_tree == "datamodules":
                # the CLI composes models with data (it imports every class so that short names resolve)
                problem = "" if name == "zoo.cli" else "a model imports a data module"
            elif tree != other_tree or other_family in ("", family):
                problem = ""  # down to the shared layer, or within the family
            elif family == "":
                problem = "the shared layer imports a family"
            elif family == "generated":
                problem = "a generated set imports a family"
            elif other_family == "generated":
                problem = ""  # a data family reads the set generated for it
            else:
                problem = "a family imports another family"
            if problem:
                violations.append(f"{path.relative_to(root)}: {problem}: {imported}")
    return violations


def test_families_import_only_the_shared_layer_and_themselves():
    assert import_violations(ROOT) == []


def test_the_check_catches_a_family_importing_another(tmp_path):
    (tmp_path / "zoo" / "detection").mkdir(parents=True)
    (tmp_path / "zoo" / "semisup").mkdir()
    (tmp_path / "datamodules" / "generated").mkdir(parents=True)
    for package in ("zoo", "zoo/detection", "zoo/semisup", "datamodules", "datamodules/generated"):
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "zoo" / "contracts.py").write_text("import torch\n")
    (tmp_path / "zoo" / "semisup" / "base.py").write_text("from zoo.contracts import x\n")
    (tmp_path / "zoo" / "detection" / "base.py").write_text(
        "from zoo.contracts import x\n\ndef f():\n    from zoo.semisup.base import check_num_classes\n")
    (tmp_path / "zoo" / "schedules.py").write_text("import zoo.detection.base\n")
    (tmp_path / "datamodules" / "base.py").write_text("")
    (tmp_path / "datamodules" / "detection.py").write_text("from datamodules.generated.canvas import write\n")
    (tmp_path / "datamodules" / "semisup.py").write_text("from datamodules.detection import x\n")
    (tmp_path / "datamodules" / "generated" / "canvas.py").write_text("from datamodules.semisup import y\n")
    (tmp_path / "zoo" / "semisup" / "uda.py").write_text("from datamodules.base import z\n")
    assert sorted(import_violations(tmp_path)) == sorted([
        "zoo/detection/base.py: a family imports another family: zoo.semisup.base",
        "zoo/schedules.py: the shared layer imports a family: zoo.detection.base",
        "datamodules/semisup.py: a family imports another family: datamodules.detection",
        "datamodules/generated/canvas.py: a generated set imports a family: datamodules.semisup",
        "zoo/semisup/uda.py: a model imports a data module: datamodules.base",
    ])


def test_data_families_are_named_after_model_families():
    model_families = {p.name for p in (ROOT / "zoo").iterdir() if (p / "__init__.py").exists()}
    shared = {"base", "sampler", "digits", "cifar", "__init__"}
    data = {p.stem for p in (ROOT / "datamodules").iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem not in shared} - {"generated"}
    assert data <= model_families, data - model_families


def test_the_worked_example_of_adding_a_paper_trains(tmp_path):
    """docs/adding_a_paper.md's FixMatch block is real code: it builds on the base and trains a few steps."""
    import re
    import types

    import lightning as L

    from datamodules.semisup import DigitsSemiSupDataModule
    from zoo.backbones import ConvNet

    text = (ROOT / "docs" / "adding_a_paper.md").read_text()
    module = types.ModuleType("fixmatch")
    exec(compile(re.search(r"```python\n(.*?)```", text, re.S).group(1), "adding_a_paper.md", "exec"), module.__dict__)
    model = module.FixMatch(backbone=ConvNet(1, widths=[8, 16], num_pools=2), num_classes=10, threshold=0.2)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsSemiSupDataModule(batch_size=8, mu=2))
    assert trainer.global_step == 3 and "train/mask_rate" in trainer.callback_metrics
