"""pipelines.settings: one conversion from Dagster config to the core dataclasses; names match.

Every core field is reachable from its Dagster class under the same name (or listed, with a reason,
as not exposed); every Dagster field lands in a core class (or is listed as the asset's own); shared
fields agree in type and, unless listed as a deliberate pipeline default, in default value.
"""

import dataclasses
import typing

import pytest

from pipelines.settings import conversions, core

CONVERSIONS = conversions()


def _core_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("conv", CONVERSIONS, ids=lambda c: c.dagster.__name__)
def test_every_core_field_is_reachable_under_its_own_name(conv):
    dagster = set(conv.dagster.model_fields)
    for cls in conv.cores:
        missing = [n for n in _core_fields(cls) if n not in dagster and n not in conv.not_exposed]
        assert not missing, f"{cls.__name__} fields {missing} cannot be set from {conv.dagster.__name__}"
    stale = [n for n in conv.not_exposed if not any(n in _core_fields(c) for c in conv.cores)]
    assert not stale, f"not_exposed names no core field: {stale}"


@pytest.mark.parametrize("conv", CONVERSIONS, ids=lambda c: c.dagster.__name__)
def test_every_dagster_field_lands_somewhere(conv):
    core_names = set().union(*(_core_fields(c) for c in conv.cores))
    orphans = [n for n in conv.dagster.model_fields if n not in core_names and n not in conv.asset_only]
    assert not orphans, f"{conv.dagster.__name__} fields {orphans} match no core field (rename them to the core's)"
    assert not set(conv.asset_only) & core_names


def _plain_type(t):
    t = typing.get_origin(t) or t
    return {list: tuple, typing.Literal: str}.get(t, t)


@pytest.mark.parametrize("conv", CONVERSIONS, ids=lambda c: c.dagster.__name__)
def test_shared_fields_agree_in_type_and_default(conv):
    dagster = conv.dagster.model_fields
    for cls in conv.cores:
        hints = typing.get_type_hints(cls)
        for name, f in _core_fields(cls).items():
            if name not in dagster:
                continue
            want = hints[name]
            options = typing.get_args(want) if typing.get_origin(want) in (typing.Union, type(int | None)) else ()
            allowed = {_plain_type(a) for a in options if a is not type(None)} or {_plain_type(want)}
            got = _plain_type(dagster[name].annotation)
            assert got in allowed or (got is int and float in allowed), f"{cls.__name__}.{name}: {got} vs {allowed}"
            if name in conv.own_defaults or f.default is dataclasses.MISSING:
                continue
            default = dagster[name].default
            default = tuple(default) if isinstance(default, list) else default
            assert default == f.default, (f"{conv.dagster.__name__}.{name} defaults to {default!r}, "
                                          f"{cls.__name__}.{name} to {f.default!r}: align them or list it in own_defaults")


@pytest.mark.parametrize("conv", CONVERSIONS, ids=lambda c: c.dagster.__name__)
def test_default_dagster_config_converts(conv):
    src = conv.dagster()
    for cls in conv.cores:
        built = core(cls, src)
        for name in _core_fields(cls):
            if name in conv.dagster.model_fields:
                value = getattr(src, name)
                assert getattr(built, name) == (tuple(value) if isinstance(value, list) else value)


def test_core_rejects_unknown_values_and_applies_overrides():
    from dreamgym_core.loop import LoopConfig

    with pytest.raises(TypeError, match="no field"):
        core(LoopConfig, tasks_per_iterations=3)
    assert core(LoopConfig, {"unused": 1} and LoopConfig(group_size=3), max_steps=7) == LoopConfig(group_size=3,
                                                                                                   max_steps=7)
