"""The package layers of docs/architecture.md hold: imports run one way, and the model floors never import Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

MIM = Path(__file__).resolve().parent.parent / "mim"

# A module may import mim modules of its own package or of a lower floor (docs/architecture.md, "Layers").
FLOORS: dict[str, int] = {
    "mim.types": 0,
    "mim.tokens": 0,
    "mim.checks": 0,
    "mim.masking": 1,
    "mim.models": 1,
    "mim.ema": 1,
    "mim.metrics": 1,
    "mim.optim": 1,
    "mim.checkpoint": 1,
    "mim.viz": 1,
    "mim.augment": 1,
    "mim.targets": 2,
    "mim.data": 2,
    "mim.distributed": 2,
    "mim.probe": 2,
    "mim.module": 3,
    "mim.probe_train": 3,
    "mim.export": 3,
    "mim.callbacks": 3,
    "mim.load": 3,
    "mim.finetune": 4,
    "mim.evaluation": 4,
    "mim.lightning_cli": 4,
    "mim.run_logging": 3,
    "mim.masks_cli": 4,
    "mim.quickstart": 5,
    "mim.cli": 6,
    "mim.__main__": 7,
    "mim": 7,
}
# Floors that hold architecture and maths only: no training framework, sharding library or logger.
FRAMEWORK_FREE = ["mim.types", "mim.tokens", "mim.checks", "mim.masking", "mim.models", "mim.targets", "mim.checkpoint"]
FRAMEWORKS = ("lightning", "pytorch_lightning", "deepspeed", "wandb")
# Reading a DeepSpeed checkpoint folder needs DeepSpeed's own reader (imported inside that one function).
ALLOWED = {("mim.checkpoint", "deepspeed")}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: its package under ``mim`` (``mim.masking.random`` -> ``mim.masking``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(MIM.rglob("*.py")):
        name = ".".join(path.relative_to(MIM.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, including those inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return out


def test_every_module_has_a_floor():
    missing = sorted({_unit(m) for m in _modules()} - FLOORS.keys())
    assert not missing, f"add these to FLOORS here and to docs/architecture.md: {missing}"


def test_imports_run_one_way():
    wrong = []
    for name, path in _modules().items():
        unit = _unit(name)
        for line, imported in _imports(path):
            if not imported.startswith("mim"):
                continue
            target = _unit(imported)
            if target != unit and FLOORS[target] >= FLOORS[unit]:
                wrong.append(
                    f"{path.relative_to(MIM.parent)}:{line} imports {imported} (floor {FLOORS[target]} >= {FLOORS[unit]})"
                )
    assert not wrong, "imports that run upward or sideways:\n" + "\n".join(wrong)


def test_model_floors_name_no_framework():
    wrong = []
    for name, path in _modules().items():
        if _unit(name) not in FRAMEWORK_FREE:
            continue
        for line, imported in _imports(path):
            root = imported.split(".")[0]
            if root in FRAMEWORKS and (_unit(name), root) not in ALLOWED:
                wrong.append(f"{path.relative_to(MIM.parent)}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_checker_sees_a_violation(tmp_path: Path):
    """The import scan finds imports inside functions (a lazy upward import would otherwise slip through)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from mim.module import PretrainModule\n    import lightning\n")
    assert _imports(src) == [(2, "mim.module"), (3, "lightning")]


@pytest.mark.timeout(120)
def test_importing_model_floors_loads_no_framework():
    """A fresh interpreter imports masking, targets, models and checkpoint without loading Lightning or DeepSpeed.

    (wandb is not checked here: timm itself imports it when installed.)
    """
    code = (
        "import sys, importlib\n"
        f"for m in {FRAMEWORK_FREE!r}: importlib.import_module(m)\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'lightning', 'pytorch_lightning', 'deepspeed'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=MIM.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
