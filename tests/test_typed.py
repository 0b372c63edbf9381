"""dapc.typed against pydantic as the oracle: the same records, the same inputs, the same values and errors.

dapc's records were pydantic models; `dapc.typed` replaced it to keep `dapc plan` fast (see its docstring). A
user must not see the difference: every input below is checked by both, and the accepted value, or the
error types, messages and locations, must agree. pydantic is a test dependency only.
"""

# No `from __future__ import annotations`: the records are declared inside a function, so their annotations
# must be objects, not names to resolve later.
import math
from typing import Annotated, Any, Literal, Optional

import pydantic
import pytest

from dapc import typed


def _records(lib: str) -> dict[str, type]:
    """The same record classes, declared on dapc.typed or on pydantic."""
    if lib == "typed":
        Base, Field, field_validator, model_validator = typed.Model, typed.Field, typed.field_validator, \
            typed.model_validator
        finite_off: dict[str, Any] = {"finite": False}
        options = {}
    else:
        Base, Field = pydantic.BaseModel, pydantic.Field
        field_validator, model_validator = pydantic.field_validator, pydantic.model_validator
        finite_off = {"allow_inf_nan": True}
        options = {"frozen": True, "allow_inf_nan": False, "validate_default": True}

    class Inner(Base, extra="forbid", **options):
        name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,7}$")] = "a"
        size: int = Field(1, ge=1, le=64)

    class Outer(Base, extra="forbid", **options):
        count: int = Field(2, gt=0)
        rate: float = Field(1e-3, gt=0, lt=1)
        flag: bool = False
        mode: Literal["auto", "on", "off"] = "auto"
        auto_or_bool: Literal["auto"] | bool = "auto"
        auto_or_int: Literal["auto"] | int = "auto"
        maybe: Optional[int] = None
        names: list[str] = Field(default_factory=list, max_length=3)
        pair: tuple[int, float] = (1, 2.0)
        tags: dict[str, int] = Field(default_factory=dict)
        inner: Inner = Field(default_factory=dict)
        inners: list[Inner] = Field(default_factory=list)
        label: str = Field("x", min_length=1, max_length=4)
        anything: Any = None

        @field_validator("names")
        @classmethod
        def _unique(cls, names: list[str]) -> list[str]:
            if len(set(names)) != len(names):
                raise ValueError("names repeat")
            return names

        @model_validator(mode="after")
        def _off_needs_no_count(self):
            if self.mode == "off" and self.count != 2:
                raise ValueError("mode off takes the default count")
            return self

    class Strict(Base, extra="ignore", strict=True, **{**options, **finite_off}):
        step: int
        loss: float
        note: str = ""

    return {"Outer": Outer, "Strict": Strict}


TYPED, PYDANTIC = _records("typed"), _records("pydantic")

OUTER_INPUTS = [
    {},
    {"count": "3", "rate": "3e-4", "flag": "yes", "maybe": 4.0},
    {"count": 2.5}, {"count": 0}, {"count": "x"}, {"count": None}, {"count": float("inf")},
    {"rate": 1}, {"rate": 0}, {"rate": "fast"}, {"rate": float("nan")}, {"rate": [1]},
    {"flag": "maybe"}, {"flag": 2}, {"flag": 1}, {"flag": "OFF"},
    {"mode": "AUTO"}, {"mode": 1}, {"mode": "off", "count": 3},
    {"auto_or_bool": True}, {"auto_or_bool": "true"}, {"auto_or_bool": "auto"}, {"auto_or_bool": 3},
    {"auto_or_int": 4}, {"auto_or_int": "4"}, {"auto_or_int": "auto"}, {"auto_or_int": "many"},
    {"maybe": None}, {"maybe": "x"},
    {"names": ["a", "b"]}, {"names": ["a", "a"]}, {"names": ["a", 1]}, {"names": "a"}, {"names": ["a"] * 4},
    {"pair": [3, "4.5"]}, {"pair": [1]}, {"pair": [1, 2, 3]}, {"pair": "12"},
    {"tags": {"a": "1"}}, {"tags": {"a": "b"}}, {"tags": []},
    {"inner": {"name": "ok-1", "size": "8"}}, {"inner": {"name": "Bad"}}, {"inner": {"name": "ok\n"}},
    {"inner": {"size": 65}}, {"inner": {"colour": 1}}, {"inner": "x"}, {"inner": None},
    {"inners": [{"name": "a"}, {"size": 0}, 3]},
    {"label": ""}, {"label": "toolong"}, {"label": 5},
    {"anything": {"free": [1, "form"]}},
    {"unknown": 1, "count": -1},
    [], "text", None,
]


def _errors(record: type, data: Any) -> list[tuple]:
    try:
        record.model_validate(data)
    except (typed.ValidationError, pydantic.ValidationError) as e:
        return sorted((err["type"], _plain_loc(err["loc"]), err["msg"]) for err in e.errors())
    return []


def _plain_loc(loc: tuple) -> tuple:
    # pydantic tags union branches in locations (`literal['auto']`, `int`, `Inner`); dapc's messages never
    # showed them (recipe errors dropped them), so the locations compare without them.
    return tuple(k for k in loc if not (isinstance(k, str) and ("[" in k or k in {"int", "float", "str", "bool"})))


@pytest.mark.parametrize("data", OUTER_INPUTS, ids=repr)
def test_lax_records_accept_and_refuse_as_pydantic_does(data):
    ours, theirs = _errors(TYPED["Outer"], data), _errors(PYDANTIC["Outer"], data)
    assert ours == theirs
    if not ours:
        assert TYPED["Outer"].model_validate(data).model_dump() == PYDANTIC["Outer"].model_validate(data).model_dump()


@pytest.mark.parametrize("data, also", [({"count": True}, []),
                                        ({"auto_or_int": False}, [("literal_error", "Input should be 'auto'")])],
                         ids=repr)
def test_a_yes_is_never_a_count(data, also):
    """The one deliberate difference: pydantic's lax mode reads `true` as 1 where an integer belongs; a recipe
    that says `steps: true` has a mistake in it, so it is refused."""
    assert PYDANTIC["Outer"].model_validate(data)
    (key,) = data
    expected = [("int_type", "Input should be a valid integer"), *also]
    assert _errors(TYPED["Outer"], data) == sorted((kind, (key,), msg) for kind, msg in expected)


STRICT_INPUTS = [
    {"step": 1, "loss": 2.5}, {"step": 1, "loss": 2}, {"step": "1", "loss": 2.5}, {"step": 1.0, "loss": 2.5},
    {"step": True, "loss": 1.0}, {"step": 1, "loss": "2.5"}, {"step": 1, "loss": float("nan")},
    {"step": 1, "loss": float("inf"), "extra": "ignored"}, {"loss": 1.0}, {"step": 1, "loss": 1.0, "note": 3},
]


@pytest.mark.parametrize("data", STRICT_INPUTS, ids=repr)
def test_strict_records_take_json_types_only_as_pydantic_does(data):
    ours, theirs = _errors(TYPED["Strict"], data), _errors(PYDANTIC["Strict"], data)
    assert ours == theirs
    if not ours:
        mine, reference = TYPED["Strict"].model_validate(data), PYDANTIC["Strict"].model_validate(data)
        assert mine.step == reference.step and type(mine.loss) is type(reference.loss)
        assert mine.loss == reference.loss or (math.isnan(mine.loss) and math.isnan(reference.loss))


def test_json_schema_is_pydantics():
    assert TYPED["Outer"].model_json_schema() == PYDANTIC["Outer"].model_json_schema()


def test_dump_excludes_and_json_mode_as_pydantic_does():
    data = {"inners": [{"name": "a", "size": 2}, {"name": "b"}], "pair": [1, 2.0], "tags": {"k": 1}}
    exclude = {"count": True, "inners": {"__all__": {"size"}}, "inner": True}
    for mode in ("python", "json"):
        assert TYPED["Outer"].model_validate(data).model_dump(mode=mode, exclude=exclude) == \
            PYDANTIC["Outer"].model_validate(data).model_dump(mode=mode, exclude=exclude)


def test_invalid_json_text_is_a_validation_error():
    with pytest.raises(typed.ValidationError) as caught:
        TYPED["Strict"].model_validate_json("{not json")
    assert caught.value.errors()[0]["type"] == "json_invalid"
    assert TYPED["Strict"].model_validate_json('{"step": 3, "loss": 0.5}').step == 3


def test_records_are_frozen_and_copied_with_updates():
    record = TYPED["Outer"].model_validate({"count": 4})
    with pytest.raises(TypeError, match="frozen"):
        record.count = 5
    copied = record.model_copy(update={"count": 5})
    assert (record.count, copied.count, copied.rate) == (4, 5, record.rate)
    assert record == TYPED["Outer"].model_validate({"count": 4}) != copied


def test_default_factories_give_each_record_its_own_value():
    first, second = TYPED["Outer"].model_validate({}), TYPED["Outer"].model_validate({})
    assert first.names == [] and first.names is not second.names


def test_a_record_class_lists_its_fields_in_declaration_order():
    fields = TYPED["Outer"].model_fields
    assert list(fields)[:3] == ["count", "rate", "flag"]
    assert fields["count"].default == 2 and not fields["count"].is_required()
    assert TYPED["Strict"].model_fields["step"].is_required()


def test_only_after_validators_exist():
    with pytest.raises(TypeError, match="mode='after'"):
        typed.model_validator(mode="before")
