"""Every built-in carries a doctest example; run them all (they are part of the contract)."""

import doctest
import importlib

import pytest

MODULES = ["bank", "math", "lengths", "formats", "toolcall", "code", "sandbox"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(f"gdpo.rewards.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"gdpo.rewards.{name} has no doctest examples"
    assert result.failed == 0


def test_every_builtin_has_a_doctest_example():
    from gdpo.rewards.bank import BUILTINS, resolve_reward_fn

    for name in BUILTINS:
        fn = resolve_reward_fn(name)
        assert ">>>" in (fn.__doc__ or ""), f"built-in {name!r} has no doctest example"
