"""Typed records: the recipe, plan.json and metrics.jsonl as frozen classes checked field by field. Torch-free.

The subset of pydantic's model API dapc uses, and nothing more: annotated fields with `Field(...)` defaults and
constraints (ge, gt, le, lt, min_length, max_length, pattern), str/int/float/bool/None, Literal, unions, list,
tuple, dict, nested records, `field_validator` and `model_validator(mode="after")`, `extra` forbid or ignore,
lax or strict input, `model_validate`, `model_dump`, `model_copy`, `model_fields` and a JSON Schema in
pydantic's dialect. The error types and messages are pydantic's, so a recipe error reads the same.

Why not pydantic itself: `dapc plan` is held to 0.3 s cold. Importing pydantic and building the validators of
the ~60 record classes took 0.15-0.2 s of that on a 2-core machine, before a recipe was read; this module
imports in milliseconds and builds a class's checker on its first use.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import types
import typing
from typing import Any, Callable, Literal, Union

__all__ = ["Field", "FieldInfo", "Model", "ValidationError", "field_validator", "model_validator"]

_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "MISSING"})()
_BAD: Any = type("_Bad", (), {"__repr__": lambda self: "BAD"})()  # a checker's "invalid; see the errors"
_TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})
_INT_TEXT = re.compile(r"[+-]?[0-9]+(_[0-9]+)*")
_CONSTRAINTS = ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern")


class FieldInfo:
    """A field's default (or factory), description and constraints; `annotation` and `name` once its class is
    built."""

    __slots__ = ("default", "default_factory", "description", "annotation", "name", *_CONSTRAINTS)

    def __init__(self, default: Any = _MISSING, *, default_factory: Callable[[], Any] | None = None,
                 description: str | None = None, ge: float | None = None, gt: float | None = None,
                 le: float | None = None, lt: float | None = None, min_length: int | None = None,
                 max_length: int | None = None, pattern: str | None = None) -> None:
        self.default, self.default_factory, self.description = default, default_factory, description
        self.ge, self.gt, self.le, self.lt = ge, gt, le, lt
        self.min_length, self.max_length, self.pattern = min_length, max_length, pattern
        self.annotation: Any = None
        self.name = ""

    def is_required(self) -> bool:
        """Returns True when the field has neither a default nor a default factory."""
        return self.default is _MISSING and self.default_factory is None


def Field(default: Any = _MISSING, **settings: Any) -> Any:  # noqa: N802 (pydantic's spelling)
    """Returns a FieldInfo: the default value (or `default_factory=`), `description=` and constraints. Also
    valid as `Annotated[T, Field(ge=1)]` metadata."""
    return FieldInfo(default, **settings)


class ValidationError(ValueError):
    """Input that does not fit a record; `errors()` lists each problem as pydantic does: type, loc, msg, input."""

    def __init__(self, title: str, errors: list[dict[str, Any]]) -> None:
        self.title, self._errors = title, errors
        first = errors[0]
        where = ".".join(str(k) for k in first["loc"]) or "(top level)"
        super().__init__(f"{len(errors)} validation error(s) for {title}: {where}: {first['msg']}")

    def errors(self) -> list[dict[str, Any]]:
        """Returns every problem as a dict: `type`, `loc` (tuple of keys and indexes), `msg`, `input`."""
        return list(self._errors)

    def error_count(self) -> int:
        """Returns how many problems the input has."""
        return len(self._errors)


def field_validator(*names: str) -> Callable[[Any], Any]:
    """Marks a classmethod `(cls, value) -> value` that checks the named fields after their types; it raises
    ValueError to refuse."""
    def mark(method: Any) -> Any:
        getattr(method, "__func__", method).__dapc_checks__ = names
        return method
    return mark


def model_validator(*, mode: Literal["after"]) -> Callable[[Any], Any]:
    """Marks a method `(self) -> self` that checks the whole record once its fields are valid; it raises
    ValueError to refuse."""
    if mode != "after":
        raise TypeError("only mode='after' validators: validators check a built record, they never rewrite input")

    def mark(method: Any) -> Any:
        method.__dapc_checks__ = ()
        return method
    return mark


Errors = list[dict[str, Any]]
Checker = Callable[[Any, tuple, Errors, bool], Any]  # (value, loc, errors, strict) -> value or _BAD


def _error(errors: Errors, kind: str, loc: tuple, msg: str, value: Any) -> Any:
    errors.append({"type": kind, "loc": loc, "msg": msg, "input": value})
    return _BAD


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _literal_text(values: tuple) -> str:
    shown = [repr(v) for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _check_none(value, loc, errors, strict):
    return None if value is None else _error(errors, "none_required", loc, "Input should be None", value)


def _check_str(value, loc, errors, strict):
    return value if isinstance(value, str) else _error(errors, "string_type", loc, "Input should be a valid string",
                                                       value)


def _check_bool(value, loc, errors, strict):
    if isinstance(value, bool):
        return value
    if not strict:
        if isinstance(value, (int, float)) and (isinstance(value, int) or value.is_integer()):
            if value in (0, 1):
                return bool(value)
            return _error(errors, "bool_parsing", loc, "Input should be a valid boolean, unable to interpret input",
                          value)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE_WORDS or word in _FALSE_WORDS:
                return word in _TRUE_WORDS
            return _error(errors, "bool_parsing", loc, "Input should be a valid boolean, unable to interpret input",
                          value)
    return _error(errors, "bool_type", loc, "Input should be a valid boolean", value)


def _check_int(value, loc, errors, strict):
    if isinstance(value, int) and not isinstance(value, bool):  # true is not 1: a yes where a count belongs
        return value
    if not strict and isinstance(value, float):
        if not math.isfinite(value):
            return _error(errors, "finite_number", loc, "Input should be a finite number", value)
        if value.is_integer():
            return int(value)
        return _error(errors, "int_from_float", loc,
                      "Input should be a valid integer, got a number with a fractional part", value)
    if not strict and isinstance(value, str):
        if _INT_TEXT.fullmatch(value.strip()):
            return int(value.strip())
        return _error(errors, "int_parsing", loc,
                      "Input should be a valid integer, unable to parse string as an integer", value)
    return _error(errors, "int_type", loc, "Input should be a valid integer", value)


def _check_float(value, loc, errors, strict):
    number = _check_number(value, loc, errors, strict)
    if number is not _BAD and not math.isfinite(number):
        return _error(errors, "finite_number", loc, "Input should be a finite number", value)
    return number


def _check_number(value, loc, errors, strict):
    number: Any = _BAD
    if isinstance(value, float):
        number = value
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return _error(errors, "finite_number", loc, "Input should be a finite number", value)
    elif isinstance(value, str) and not strict:
        try:
            number = float(value.strip())
        except ValueError:
            return _error(errors, "float_parsing", loc,
                          "Input should be a valid number, unable to parse string as a number", value)
    if number is _BAD:
        return _error(errors, "float_type", loc, "Input should be a valid number", value)
    return number


def _check_any(value, loc, errors, strict):
    return value


def _literal_checker(values: tuple) -> Checker:
    msg = f"Input should be {_literal_text(values)}"

    def check(value, loc, errors, strict):
        for allowed in values:
            if type(value) is type(allowed) and value == allowed:
                return allowed
        return _error(errors, "literal_error", loc, msg, value)
    return check


def _model_checker(cls: type[Model]) -> Checker:
    def check(value, loc, errors, strict):
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls._check_dict(value, loc, errors, strict)
        return _error(errors, "model_type", loc, f"Input should be a valid dictionary or instance of {cls.__name__}",
                      value)
    return check


def _sequence_checker(item: Checker, kind: str, fixed: tuple[Checker, ...] | None) -> Checker:
    word, make = ("list", list) if kind == "list" else ("tuple", tuple)

    def check(value, loc, errors, strict):
        if not isinstance(value, (list, tuple)):
            return _error(errors, f"{word}_type", loc, f"Input should be a valid {word}", value)
        if fixed is not None and len(value) > len(fixed):
            return _error(errors, "too_long", loc, f"Tuple should have at most {_plural(len(fixed), 'item')} "
                          f"after validation, not {len(value)}", value)
        before = len(errors)
        checkers = fixed if fixed is not None else (item,) * len(value)
        out = [c(v, loc + (i,), errors, strict) for i, (c, v) in enumerate(zip(checkers, value))]
        for i in range(len(value), len(checkers)):  # a short fixed tuple: each absent position is missing
            _error(errors, "missing", loc + (i,), "Field required", value)
        return _BAD if len(errors) > before else make(out)
    return check


def _dict_checker(key: Checker, value_checker: Checker) -> Checker:
    def check(value, loc, errors, strict):
        if not isinstance(value, dict):
            return _error(errors, "dict_type", loc, "Input should be a valid dictionary", value)
        before = len(errors)
        out = {key(k, loc + (k, "[key]"), errors, strict): value_checker(v, loc + (k,), errors, strict)
               for k, v in value.items()}
        return _BAD if len(errors) > before else out
    return check


def _union_checker(branches: tuple[Checker, ...]) -> Checker:
    def check(value, loc, errors, strict):
        # An exact match first (pydantic's smart mode): `true` for `Literal["auto"] | bool` is the bool as it is.
        for branch in branches:
            found = branch(value, loc, [], True)
            if found is not _BAD:
                return found
        tried: Errors = []
        if not strict:
            for branch in branches:
                found = branch(value, loc, tried, False)
                if found is not _BAD:
                    return found
        else:
            for branch in branches:
                branch(value, loc, tried, True)
        errors.extend(tried)
        return _BAD
    return check


def _nullable_checker(inner: Checker) -> Checker:
    def check(value, loc, errors, strict):
        return None if value is None else inner(value, loc, errors, strict)
    return check


def _constrained(inner: Checker, field: FieldInfo) -> Checker:
    bounds = [(name, getattr(field, name)) for name in ("ge", "gt", "le", "lt") if getattr(field, name) is not None]
    lengths = (field.min_length, field.max_length)
    pattern = field.pattern
    # Anchored like pydantic's regex engine: `$` is the end of the text, not the end before a final newline.
    compiled = re.compile(pattern[:-1] + r"\Z" if pattern and pattern.endswith("$") and not pattern.endswith("\\$")
                          else pattern) if pattern else None
    if not bounds and lengths == (None, None) and compiled is None:
        return inner
    words = {"ge": "greater than or equal to", "gt": "greater than", "le": "less than or equal to", "lt": "less than"}
    holds = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}
    kinds = {"ge": "greater_than_equal", "gt": "greater_than", "le": "less_than_equal", "lt": "less_than"}

    def check(value, loc, errors, strict):
        value = inner(value, loc, errors, strict)
        if value is _BAD:
            return _BAD
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for name, bound in bounds:
                if not holds[name](value, bound):
                    return _error(errors, kinds[name], loc, f"Input should be {words[name]} {bound}", value)
        if isinstance(value, str):
            if field.min_length is not None and len(value) < field.min_length:
                return _error(errors, "string_too_short", loc,
                              f"String should have at least {_plural(field.min_length, 'character')}", value)
            if field.max_length is not None and len(value) > field.max_length:
                return _error(errors, "string_too_long", loc,
                              f"String should have at most {_plural(field.max_length, 'character')}", value)
            if compiled is not None and not compiled.search(value):
                return _error(errors, "string_pattern_mismatch", loc, f"String should match pattern '{pattern}'", value)
        elif isinstance(value, (list, tuple, dict)):
            word = {list: "List", tuple: "Tuple", dict: "Dictionary"}[type(value)]
            if field.min_length is not None and len(value) < field.min_length:
                return _error(errors, "too_short", loc, f"{word} should have at least "
                              f"{_plural(field.min_length, 'item')} after validation, not {len(value)}", value)
            if field.max_length is not None and len(value) > field.max_length:
                return _error(errors, "too_long", loc, f"{word} should have at most "
                              f"{_plural(field.max_length, 'item')} after validation, not {len(value)}", value)
        return value
    return check


def _split_annotated(annotation: Any) -> tuple[Any, FieldInfo | None]:
    if typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        infos = [m for m in meta if isinstance(m, FieldInfo)]
        return base, (infos[0] if infos else None)
    return annotation, None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _checker(annotation: Any, field: FieldInfo | None = None, finite: bool = True) -> Checker:
    """Returns the checker of `annotation`, with the constraints of `field` applied to its non-None part; a float
    must be finite where `finite`."""
    annotation, meta = _split_annotated(annotation)
    if meta is not None:
        inner = _checker(annotation, meta, finite)
        return inner if field is None else _constrained(inner, field)
    if _is_union(annotation):
        args = typing.get_args(annotation)
        rest = tuple(a for a in args if a is not type(None))
        inner = _checker(rest[0], field, finite) if len(rest) == 1 else \
            _union_checker(tuple(_checker(a, field, finite) for a in rest))
        return _nullable_checker(inner) if len(rest) < len(args) else inner
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        found = _literal_checker(args)
    elif origin is list:
        found = _sequence_checker(_checker(args[0], None, finite), "list", None)
    elif origin is tuple:
        variable = len(args) == 2 and args[1] is Ellipsis
        found = _sequence_checker(_checker(args[0], None, finite), "tuple", None) if variable else \
            _sequence_checker(_check_any, "tuple", tuple(_checker(a, None, finite) for a in args))
    elif origin is dict:
        found = _dict_checker(_checker(args[0], None, finite), _checker(args[1], None, finite))
    elif isinstance(annotation, type) and issubclass(annotation, Model):
        found = _model_checker(annotation)
    else:
        simple = {str: _check_str, int: _check_int, float: _check_float if finite else _check_number,
                  bool: _check_bool, type(None): _check_none,
                  Any: _check_any, object: _check_any}
        if annotation not in simple:
            raise TypeError(f"dapc.typed does not check {annotation!r}")
        found = simple[annotation]
    return found if field is None else _constrained(found, field)


class _Built:
    """A record class's fields, their checkers and its validators, built on first use."""

    def __init__(self, cls: type[Model]) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        self.fields: dict[str, FieldInfo] = {}
        for name, annotation in hints.items():
            if name.startswith("_") or typing.get_origin(annotation) is typing.ClassVar:
                continue
            declared = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), _MISSING)
            field = declared if isinstance(declared, FieldInfo) else FieldInfo(declared)
            field.annotation, field.name = _split_annotated(annotation)[0], name
            self.fields[name] = field
        self.checkers = {name: _checker(hints[name], f, cls._finite) for name, f in self.fields.items()}
        self.field_checks: list[tuple[tuple[str, ...], Callable]] = []
        self.record_checks: list[Callable] = []
        seen: set[str] = set()
        for klass in cls.__mro__:
            for attr, member in klass.__dict__.items():
                function = getattr(member, "__func__", member)
                names = getattr(function, "__dapc_checks__", None)
                if names is None or attr in seen:
                    continue
                seen.add(attr)
                if names:
                    self.field_checks.append((names, getattr(cls, attr)))
                else:
                    self.record_checks.append(function)


class _ClassProperty:
    def __init__(self, getter: Callable[[type], Any]) -> None:
        self.getter = getter

    def __get__(self, instance: Any, owner: type) -> Any:
        return self.getter(owner)


class Model:
    """A frozen record. Subclass options: `extra` ("forbid", the default, or "ignore"), `strict` (False: lax
    input as pydantic's, "3" is 3 and "3e-4" a float; True: JSON's own types only) and `finite` (True: a float
    is never inf or NaN; False lets a diverged loss be read back)."""

    _extra: str = "forbid"
    _strict: bool = False
    _finite: bool = True
    _built: _Built | None = None

    def __init_subclass__(cls, extra: str | None = None, strict: bool | None = None, finite: bool | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if extra is not None:
            cls._extra = extra
        if strict is not None:
            cls._strict = strict
        if finite is not None:
            cls._finite = finite
        cls._built = None

    @classmethod
    def _schema(cls) -> _Built:
        built = cls.__dict__.get("_built")
        if built is None:
            built = _Built(cls)
            cls._built = built
        return built

    model_fields = _ClassProperty(lambda cls: cls._schema().fields)

    @classmethod
    def _check_dict(cls, data: dict, loc: tuple, errors: Errors, strict: bool) -> Any:
        built = cls._schema()
        strict = strict or cls._strict
        before = len(errors)
        values: dict[str, Any] = {}
        for name, field in built.fields.items():
            if name in data:
                raw = data[name]
            elif field.default_factory is not None:
                raw = field.default_factory()
            elif field.default is not _MISSING:
                raw = field.default
            else:
                _error(errors, "missing", loc + (name,), "Field required", data)
                continue
            values[name] = built.checkers[name](raw, loc + (name,), errors, strict)
        if cls._extra == "forbid":
            for key in data:
                if key not in built.fields:
                    _error(errors, "extra_forbidden", loc + (key,), "Extra inputs are not permitted", data[key])
        if len(errors) > before:
            return _BAD
        for names, check in built.field_checks:
            for name in names:
                try:
                    values[name] = check(values[name])
                except ValueError as e:
                    _error(errors, "value_error", loc + (name,), f"Value error, {e}", values[name])
        if len(errors) > before:
            return _BAD
        record = object.__new__(cls)
        object.__setattr__(record, "__dict__", values)
        for check in built.record_checks:
            try:
                check(record)
            except ValueError as e:
                return _error(errors, "value_error", loc, f"Value error, {e}", data)
        return record

    @classmethod
    def model_validate(cls, data: Any, *, strict: bool | None = None) -> Any:
        """Returns the record `data` (a dict, or a record of this class) describes. Raises ValidationError listing
        every problem."""
        errors: Errors = []
        record = _model_checker(cls)(data, (), errors, bool(strict))
        if record is _BAD:
            raise ValidationError(cls.__name__, errors)
        return record

    @classmethod
    def model_validate_json(cls, text: str | bytes, *, strict: bool | None = None) -> Any:
        """Returns the record the JSON `text` describes. Raises ValidationError (json_invalid for text that is not
        JSON)."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValidationError(cls.__name__, [{"type": "json_invalid", "loc": (), "msg": f"Invalid JSON: {e}",
                                                  "input": text}]) from e
        return cls.model_validate(data, strict=strict)

    def __init__(self, **data: Any) -> None:
        record = type(self).model_validate(data)
        object.__setattr__(self, "__dict__", record.__dict__)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"{type(self).__name__} is frozen: use model_copy(update=...)")

    def __delattr__(self, name: str) -> None:
        raise TypeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __hash__(self) -> int:
        return hash((type(self), *self.__dict__.values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def model_copy(self, *, update: dict[str, Any] | None = None) -> Any:
        """Returns a copy with the fields in `update` replaced (not checked again: the caller builds valid
        values)."""
        copied = object.__new__(type(self))
        object.__setattr__(copied, "__dict__", {**self.__dict__, **(update or {})})
        return copied

    def model_dump(self, *, mode: Literal["python", "json"] = "python", exclude: Any = None) -> dict[str, Any]:
        """Returns the record as nested dicts: records become dicts; `mode="json"` also turns tuples into lists.
        `exclude`: field names, or a dict of name → True or a nested exclude (`"__all__"` for every item)."""
        return _dump(self, mode == "json", exclude)

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]:
        """Returns the JSON Schema of the record, in the dialect pydantic writes (`$defs`, `anyOf`, titles)."""
        defs: dict[str, Any] = {}
        top = _model_json_schema(cls, defs)
        if defs:
            top["$defs"] = defs
        return top


def _excluded(exclude: Any, key: Any) -> bool:
    if isinstance(exclude, (set, frozenset)):
        return key in exclude
    return isinstance(exclude, dict) and exclude.get(key) is True


def _inner_exclude(exclude: Any, key: Any) -> Any:
    if not isinstance(exclude, dict):
        return None
    inner = exclude.get(key, exclude.get("__all__"))
    return None if inner is True else inner


def _dump(value: Any, as_json: bool, exclude: Any) -> Any:
    if isinstance(value, Model):
        return {k: _dump(v, as_json, _inner_exclude(exclude, k)) for k, v in value.__dict__.items()
                if not _excluded(exclude, k)}
    if isinstance(value, (list, tuple)):
        items = [_dump(v, as_json, _inner_exclude(exclude, i)) for i, v in enumerate(value)]
        return items if as_json or isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _dump(v, as_json, _inner_exclude(exclude, k)) for k, v in value.items() if not _excluded(exclude, k)}
    return value


_JSON_KEYWORDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum",
                  "pattern": "pattern"}
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _json_schema(annotation: Any, field: FieldInfo | None, defs: dict[str, Any]) -> dict[str, Any]:
    annotation, meta = _split_annotated(annotation)
    if meta is not None:
        inner = _json_schema(annotation, meta, defs)
        return inner if field is None else _with_constraints(inner, field)
    if _is_union(annotation):
        return {"anyOf": [_json_schema(a, field if a is not type(None) else None, defs)
                          for a in typing.get_args(annotation)]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        kinds = {_JSON_TYPES[type(v)] for v in args}
        found: dict[str, Any] = {"const": args[0]} if len(args) == 1 else {"enum": list(args)}
        if len(kinds) == 1:
            found["type"] = kinds.pop()
    elif origin in (list, tuple) and not (origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)):
        found = {"items": _json_schema(args[0], None, defs), "type": "array"}
    elif origin is tuple:
        found = {"maxItems": len(args), "minItems": len(args), "prefixItems": [_json_schema(a, None, defs)
                                                                               for a in args], "type": "array"}
    elif origin is dict:
        values = _json_schema(args[1], None, defs)
        found = {"additionalProperties": values if values else True, "type": "object"}
    elif isinstance(annotation, type) and issubclass(annotation, Model):
        if annotation.__name__ not in defs:
            defs[annotation.__name__] = {}  # reserved first: a record may refer to itself
            defs[annotation.__name__] = _model_json_schema(annotation, defs)
        found = {"$ref": f"#/$defs/{annotation.__name__}"}
    elif annotation in (Any, object):
        found = {}
    else:
        found = {"type": _JSON_TYPES[annotation]}
    return found if field is None else _with_constraints(found, field)


def _with_constraints(schema: dict[str, Any], field: FieldInfo) -> dict[str, Any]:
    schema = dict(schema)
    for name, keyword in _JSON_KEYWORDS.items():
        if getattr(field, name) is not None:
            schema[keyword] = getattr(field, name)
    sized = "Length" if schema.get("type") == "string" else ("Items" if schema.get("type") == "array" else
                                                             "Properties")
    if field.min_length is not None:
        schema[f"min{sized}"] = field.min_length
    if field.max_length is not None:
        schema[f"max{sized}"] = field.max_length
    return schema


def _model_json_schema(cls: type[Model], defs: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for name, field in cls.model_fields.items():
        prop = _json_schema(hints[name], field, defs)
        if field.default is not _MISSING:
            prop["default"] = _dump(field.default, True, None)
        if field.description is not None:
            prop["description"] = field.description
        if "$ref" not in prop and not any("$ref" in branch for branch in prop.get("anyOf", ())):
            prop["title"] = name.title().replace("_", " ")
        properties[name] = prop
    schema: dict[str, Any] = {"properties": properties, "title": cls.__name__, "type": "object"}
    required = [name for name, field in cls.model_fields.items() if field.is_required()]
    if required:
        schema["required"] = required
    if cls._extra == "forbid":
        schema["additionalProperties"] = False
    if cls.__doc__:
        schema["description"] = inspect.cleandoc(cls.__doc__)
    return schema
