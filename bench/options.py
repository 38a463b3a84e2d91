"""Typed method options: each method declares one frozen dataclass; its fields are the method's options.

A field's type, default and help are written once, in that dataclass (:func:`option` adds the help, choices,
a range and the sweep axis label as field metadata). Everything else reads them from there: ``bench run -O
NAME=VALUE``, ``bench sweep --set/--param``, ``bench methods show``, the run's recorded options and the rule that
decides whether two runs are the same run (:func:`effective`). Standard library only.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Option names recorded by runs made before options were typed, which are no options any more: the method's
#: seed (now the run's ``--seed``) and torch.compile (now the run's ``--compile``, which changes no number).
RETIRED = ("seed", "compile")
_NONE_WORDS = ("none", "null")


def option(default: Any, help: str, *, choices: tuple[str, ...] = (), low: float | None = None,
           high: float | None = None, above: float | None = None, label: str | None = None,
           legacy: str | None = None, sweep: bool = True) -> Any:
    """A dataclass field with its help text (shown by ``bench methods show``) and its checks.

    ``choices``: the valid values of a text option. ``low``/``high``: inclusive bounds; ``above``: an exclusive
    lower bound. ``label``: the sweep axis label (default: the help's first clause). ``legacy``: the name runs
    recorded before options were typed (read from old run folders only). ``sweep``: whether ``bench sweep
    --param`` may vary it (numeric options only)."""
    meta = {"help": help, "choices": tuple(choices), "low": low, "high": high, "above": above,
            "label": label or help.split(";")[0].split(" [")[0], "legacy": legacy, "sweep": sweep}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclass(frozen=True)
class Spec:
    """One option as read from its dataclass field."""

    name: str
    kinds: tuple[type, ...]  # the accepted types, e.g. (int,) or (int, str) or (float, NoneType)
    default: Any
    help: str
    choices: tuple[str, ...]
    low: float | None
    high: float | None
    above: float | None
    label: str
    legacy: str | None
    sweep: bool

    @property
    def optional(self) -> bool:
        return type(None) in self.kinds

    @property
    def numeric(self) -> type | None:
        """``int`` or ``float`` when the option takes a number, else None."""
        return next((k for k in (int, float) if k in self.kinds), None)

    def type_name(self) -> str:
        names = [k.__name__ for k in self.kinds if k is not type(None)]
        if self.choices:
            names = [n for n in names if n != "str"] + [" | ".join(self.choices)]
        return " | ".join(names) + (" | none" if self.optional else "")


def specs(cls: type) -> list[Spec]:
    """The options of an options dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        out.append(Spec(f.name, _kinds(hints[f.name]), f.default, meta.get("help", ""), meta.get("choices", ()),
                        meta.get("low"), meta.get("high"), meta.get("above"), meta.get("label", f.name),
                        meta.get("legacy"), meta.get("sweep", True)))
    return out


def _kinds(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(typing.get_args(hint))
    return (hint,)


def convert(spec: Spec, value: Any, owner: str) -> Any:
    """``value`` (a typed value or the text typed after ``NAME=``) as the option's type, checked."""
    where = f"{owner} option {spec.name}"
    if isinstance(value, str):
        value = _from_text(spec, value.strip(), where)
    if value is None:
        if not spec.optional:
            raise ValueError(f"{where} needs a value ({spec.type_name()})")
        return None
    if isinstance(value, bool) and bool not in spec.kinds:
        raise ValueError(f"{where}: expected {spec.type_name()}, got {value!r}")
    if isinstance(value, str):
        return value
    if spec.numeric is int and isinstance(value, float) and value.is_integer() and float not in spec.kinds:
        value = int(value)
    if not isinstance(value, tuple(k for k in spec.kinds if k is not type(None))) and not (
            spec.numeric is float and isinstance(value, int)):
        raise ValueError(f"{where}: expected {spec.type_name()}, got {value!r}")
    if spec.numeric is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_range(spec, value, where)
    return value


def _from_text(spec: Spec, text: str, where: str) -> Any:
    if text.lower() in _NONE_WORDS and spec.optional:
        return None
    if text in spec.choices:
        return text
    for kind in spec.kinds:
        if kind is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
        if kind is str and not spec.choices:
            return text
    valid = spec.type_name().replace("bool", "true | false")
    raise ValueError(f"{where}: cannot read {text!r}; valid: {valid}")


def _check_range(spec: Spec, value: float, where: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}")
    bounds = [(spec.low, value >= spec.low if spec.low is not None else True, "≥"),
              (spec.above, value > spec.above if spec.above is not None else True, ">"),
              (spec.high, value <= spec.high if spec.high is not None else True, "≤")]
    wrong = [f"{sign} {bound:g}" for bound, ok, sign in bounds if bound is not None and not ok]
    if wrong:
        rule = " and ".join(f"{sign} {bound:g}" for bound, _, sign in bounds if bound is not None)
        raise ValueError(f"{where} must be {rule}, got {value:g}")


def given(cls: type, values: Mapping[str, Any], owner: str, recorded: bool = False) -> dict:
    """The options ``values`` sets explicitly (typed values or text; ``None`` = not given), converted and checked,
    under their names. Unknown names raise, listing the valid ones; every problem is reported at once.
    ``recorded``: the values come from a run folder, possibly written by an earlier version (their legacy names
    are read and the :data:`RETIRED` ones dropped)."""
    by_name = {s.name: s for s in specs(cls)}
    by_legacy = {s.legacy: s for s in by_name.values() if s.legacy} if recorded else {}
    out, problems = {}, []
    for name, value in values.items():
        key = name.replace("-", "_")
        spec = by_name.get(key) or by_legacy.get(key)
        if spec is None:
            if not (recorded and key in RETIRED):
                valid = ", ".join(by_name) or "none"
                problems.append(f"{owner} has no option {name!r}; valid: {valid} (see `bench methods show`)")
        elif value is not None:
            try:
                out[spec.name] = convert(spec, value, owner)
            except ValueError as err:
                problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))
    cls(**out)  # the dataclass's own checks of combinations (e.g. FLORAIN's lam_scale with the raw form)
    return out


def build(cls: type, values: Mapping[str, Any], owner: str, recorded: bool = False) -> Any:
    """An instance of ``cls`` from ``values`` (as :func:`given`)."""
    return cls(**given(cls, values, owner, recorded))


def effective(cls: type, values: Mapping[str, Any], owner: str, recorded: bool = False) -> dict:
    """Every option with its default filled in: what "the same options" means (``lam=5`` equals no ``lam``)."""
    return dataclasses.asdict(build(cls, values, owner, recorded))


def parse_assignments(items: Iterable[str], flag: str = "-O") -> dict[str, str]:
    """``NAME=VALUE`` items into ``{NAME: VALUE}`` (values stay text; :func:`build` converts them)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE, e.g. {flag} rank=16")
        if not value.strip():
            raise ValueError(f"{flag} {item!r}: missing value after '='")
        key = name.strip().replace("-", "_")
        if key in out:
            raise ValueError(f"{flag} sets {key!r} twice")
        out[key] = value.strip()
    return out


def describe(cls: type) -> list[dict]:
    """One row per option: name, type, default, help (``bench methods show``)."""
    return [{"name": s.name, "type": s.type_name(), "default": s.default, "help": s.help} for s in specs(cls)]
