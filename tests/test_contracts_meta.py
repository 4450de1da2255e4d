"""Every concrete MaskingStrategy, Target and Encoder in ``mim`` must have a contract test."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import mim.masking
import mim.models
import mim.targets
from mim.masking.base import MaskingStrategy
from mim.models.base import Encoder
from mim.targets.base import Target
from tests.contracts import EncoderContract, MaskingStrategyContract, TargetContract

TESTS = Path(__file__).parent


def _import_all(package) -> None:
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
        importlib.import_module(info.name)


def _all_subclasses(cls: type) -> set[type]:
    found: set[type] = set()
    stack = [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


def concrete_in_mim(base: type) -> set[type]:
    """Non-abstract subclasses of ``base`` defined in the ``mim`` package (test-local classes do not count)."""
    return {
        c
        for c in _all_subclasses(base)
        if not inspect.isabstract(c) and (c.__module__ == "mim" or c.__module__.startswith("mim."))
    }


def contract_tests(contract: type, attr: str) -> dict[type, list[type]]:
    """Import every test module that mentions a contract and map each covered class to its test classes."""
    for path in sorted(TESTS.glob("test_*.py")):
        if "Contract" in path.read_text(encoding="utf-8"):
            importlib.import_module(f"tests.{path.stem}")
    covered: dict[type, list[type]] = {}
    for test_cls in _all_subclasses(contract):
        if not test_cls.__name__.startswith("Test"):
            continue  # pytest would not collect it
        cls = test_cls.__dict__.get(attr)
        if cls is not None:
            covered.setdefault(cls, []).append(test_cls)
    return covered


@pytest.fixture(scope="module", autouse=True)
def _import_packages() -> None:
    _import_all(mim.masking)
    _import_all(mim.targets)
    _import_all(mim.models)


def test_masking_strategies_have_contract_tests() -> None:
    strategies = concrete_in_mim(MaskingStrategy)
    assert strategies, "found no concrete MaskingStrategy in mim (discovery is broken)"
    covered = contract_tests(MaskingStrategyContract, "strategy_cls")
    missing = sorted(c.__qualname__ for c in strategies if c not in covered)
    assert not missing, f"MaskingStrategy classes without a MaskingStrategyContract test: {missing}"


def test_targets_have_contract_tests() -> None:
    targets = concrete_in_mim(Target)
    assert targets, "found no concrete Target in mim (discovery is broken)"
    covered = contract_tests(TargetContract, "target_cls")
    missing = sorted(c.__qualname__ for c in targets if c not in covered)
    assert not missing, f"Target classes without a TargetContract test: {missing}"


def test_encoders_have_contract_tests() -> None:
    encoders = concrete_in_mim(Encoder)
    assert encoders, "found no concrete Encoder in mim (discovery is broken)"
    covered = contract_tests(EncoderContract, "encoder_cls")
    missing = sorted(c.__qualname__ for c in encoders if c not in covered)
    assert not missing, f"Encoder classes without an EncoderContract test: {missing}"


def test_discovery_sees_known_classes() -> None:
    from mim.masking.random import RandomMasking
    from mim.targets.pixels import PixelTarget

    assert RandomMasking in concrete_in_mim(MaskingStrategy)
    assert PixelTarget in concrete_in_mim(Target)
    from mim.models import MaskedEncoder, MaskedTableEncoder

    assert {MaskedEncoder, MaskedTableEncoder} <= concrete_in_mim(Encoder)
    # abstract bases are never required to have a contract test
    from mim.masking.base import ScoreMasking

    assert ScoreMasking not in concrete_in_mim(MaskingStrategy)
    assert Target not in concrete_in_mim(Target)
    assert Encoder not in concrete_in_mim(Encoder)


def test_meta_test_can_fail() -> None:
    """A concrete strategy defined in a ``mim`` module but with no contract test is reported missing."""

    class Uncovered(MaskingStrategy):
        def __call__(self, batch_size, grid, *, generator, device, scores=None, progress=0.0):
            raise NotImplementedError

    Uncovered.__module__ = "mim.masking.fake_uncovered"
    try:
        covered = contract_tests(MaskingStrategyContract, "strategy_cls")
        assert Uncovered in concrete_in_mim(MaskingStrategy)
        assert Uncovered not in covered
    finally:
        Uncovered.__module__ = __name__
