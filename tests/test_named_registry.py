"""lightnets.registry.Registry: the one way named things are registered and looked up."""

from __future__ import annotations

import pytest

from lightnets.errors import UserError
from lightnets.registry import Registry


def test_register_lookup_and_mapping_behaviour():
    reg: Registry[int] = Registry("widget", normalize=str.lower)
    reg.add("alpha", 1)

    @reg.register()
    def beta():
        return 2

    assert reg.lookup("ALPHA") == 1 and reg.lookup("beta") is beta
    assert "alpha" in reg and list(reg) == ["alpha", "beta"] and len(reg) == 2
    assert reg.get("gamma") is None and dict(reg) == {"alpha": 1, "beta": beta}
    assert reg.names() == ["alpha", "beta"]
    reg.add("alpha", 1)  # the same object again (a module imported twice): fine
    with pytest.raises(ValueError, match="widget 'alpha' is registered twice"):
        reg.add("alpha", 3)
    reg.remove("alpha")
    assert "alpha" not in reg


def test_unknown_name_is_one_user_error_with_a_suggestion():
    reg: Registry[int] = Registry("dataset")
    reg.add("cifar10", 1)
    reg.add("mnist", 2)
    with pytest.raises(UserError, match=r"unknown dataset 'cifar01'.*cifar10.*expected one of"):
        reg.lookup("cifar01")
    with pytest.raises(UserError, match="unknown dataset 3"):
        reg.key(3)
