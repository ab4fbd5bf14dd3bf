"""A config field that is also a command-line flag: ``setting(default, "help", ...)`` is a dataclass field whose
metadata carries the flag's help and spelling, and ``add_flags`` turns a config type's fields into a parser's flags.

Every stage's flags come from its config type this way (``openllm_ds.config.stages.STAGES``): a new setting is one
field. A flag's value type follows the field's annotation (``int`` -> a 64-bit integer, ``float`` -> a finite
number, ``bool`` -> a switch, ``tuple[str, ...]`` -> one or more values), or the field's ``parse``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Callable

INT64 = (-(1 << 63), (1 << 63) - 1)  # every integer setting fits what torch and numpy take


def setting(default: Any = MISSING, help: str | None = None, *, flag: str | None = None, aliases: tuple = (),
            stages: tuple[str, ...] | None = None, parse: Callable | None = None, nargs: str | None = None,
            metavar: str | None = None, required: bool = False, hidden: bool = False,
            default_factory: Any = MISSING) -> Any:
    """A dataclass field; with ``help`` (a text, or a function giving it) also a flag (``flag``, default ``--NAME``) of the stages that read its config
    type (``stages`` narrows them: the tokenizer section's fields are flags of three stages, not all of one)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "stages": stages, "parse": parse, "nargs": nargs,
            "metavar": metavar, "required": required, "hidden": hidden}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---- value types: argparse's, each a one-line error naming the flag ----------------------------------------

def parse_int(text: str) -> int:
    """An integer that torch and numpy can take (a 64-bit one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not INT64[0] <= value <= INT64[1]:
        raise argparse.ArgumentTypeError(f"{text} is out of range (a 64-bit integer at most)")
    return value


def parse_any_int(text: str) -> int:
    """Any integer; its range is checked where the value is used (a seed: openllm_ds.inference.sampling)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def parse_float(text: str) -> float:
    """A finite number (NaN and inf are refused here, not deep inside a stage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_port(text: str) -> int:
    value = parse_int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535 (0: any free one), got {value}")
    return value


def parse_workers(text: str) -> int | str:
    """``auto`` or a number of workers."""
    return "auto" if text.strip().lower() == "auto" else parse_int(text)


def parse_csv(text: str) -> tuple[str, ...]:
    """A comma list: ``perplexity,loss`` -> ("perplexity", "loss")."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _value_type(tp: Any) -> Callable | None:
    """The argparse type of an annotation: the first of int, float, str an optional or a union holds."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _value_type(inner[0])
    return {int: parse_int, float: parse_float}.get(tp, str)


# ---- fields -> flags ------------------------------------------------------------------------------------

def flag_fields(cls, stage: str, owner: str | None = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags of ``stage`` (``owner``: the stage a section's flags belong to by
    default)."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("help"):
            continue
        if stage in (meta.get("stages") or (owner or stage,)):
            out.append(f)
    return out


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{f.name}"


def add_flags(parser: argparse.ArgumentParser, cls, stage: str, section: str | None = None,
              owner: str | None = None) -> list[tuple[str, str]]:
    """Add the flags of ``cls``'s fields for ``stage``; return their (dest, flag).

    A section of the run config (``section``) sets ``section.key`` only when its flag is given (default None: the
    run config's precedence decides); a stage's own config type takes the field's default."""
    hints = typing.get_type_hints(cls)
    added = []
    for f in flag_fields(cls, stage, owner):
        meta, tp = f.metadata, hints[f.name]
        name = flag_name(f)
        dest = f"{section}.{f.name}" if section else f.name
        flags = [name, *meta["aliases"]]
        if section:
            default = None
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        text = meta["help"]() if callable(meta["help"]) else meta["help"]  # a callable: read when the parser is built
        help_ = argparse.SUPPRESS if meta["hidden"] else (f"{text} [{dest}]" if section else text)
        kw: dict[str, Any] = {"dest": dest, "default": default, "help": help_}
        if tp is bool and meta["parse"] is None:
            if name.startswith("--no_"):  # a switch that sets the field to false
                kw.update(action="store_const", const=False)
                flags.append("--no-" + name[len("--no_"):].replace("_", "-"))
            elif f.default is True and not section:
                kw.update(action=argparse.BooleanOptionalAction)
            else:
                kw.update(action="store_const", const=True)
        else:
            origin = typing.get_origin(tp)
            if origin is tuple and meta["nargs"] == "append":  # repeatable: --flag A --flag B
                kw.update(action="append", type=str, default=None if section else [])
            elif origin is tuple and meta["parse"] is None:
                kw.update(nargs=meta["nargs"] or "+", type=str)
            else:
                kw["type"] = meta["parse"] or _value_type(tp)
            kw["metavar"] = meta["metavar"] or (name[2:].upper() if section else None)
            if meta["required"]:
                kw.update(required=True)
                kw.pop("default")
        parser.add_argument(*flags, **{k: v for k, v in kw.items() if v is not None or k == "default"})
        added.append((dest, name))
    return added


def stage_config(cls, args: argparse.Namespace):
    """A stage's own config from the parsed flags (every field of ``cls`` that is a flag of it; the rest default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
