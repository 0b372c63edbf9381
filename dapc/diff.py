"""`dapc diff A B`: two recipes or plan.json files, the resolved fields that differ and what they change.

Each side compiles to a `Plan` (a recipe through `compile_recipe`, a plan.json through `load_plan`), so a
recipe and the plan.json rendered from it compare equal. Part one walks the plan as dotted paths: the
resolved recipe and the planner's decisions, without the hashes and provenance (the hashes get one line
each) and without memory, cost, the ranked alternatives and suggestions, which follow from the fields: part
two reports their effect, memory per GPU by component, fit, strategy, batch geometry, time, money and
energy, A against B.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Iterator, Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dapc.errors import DapcError
from dapc.memory import GIB
from dapc.plan_schema import MAX_PLAN_BYTES, Plan, load_plan
from dapc.planner import COMPONENTS

Kind = Literal["recipe", "plan"]
HASHES = ("plan_sha256", "recipe_sha256", "trajectory_sha256")
# Left out of the field walk: hashes and provenance are noise; memory, cost, the alternatives and the
# suggestions of what would fit follow from the fields, so part two reports them as effects; model.config is
# the HF config that model.architecture already summarizes.
_NOT_FIELDS = frozenset({*HASHES, "provenance", "memory", "cost", "alternatives", "suggestions"})
_NOT_FIELD_PATHS = frozenset({"model.config"})


class _Absent:
    """A field that one side does not have (a list that is shorter, a section that is null)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class Side:
    """One operand: where it came from and the plan it compiles to."""

    path: str
    kind: Kind
    plan: Plan


@dataclass(frozen=True)
class FieldDiff:
    """One dotted path whose JSON value differs; `ABSENT` where a side lacks it."""

    path: str
    a: Any
    b: Any


@dataclass(frozen=True)
class Effect:
    """One derived figure on both sides, in the plan's own unit (`key` names it: bytes, seconds, usd)."""

    key: str
    label: str
    a: int | float | bool | str
    b: int | float | bool | str

    @property
    def delta(self) -> int | float | None:
        """Returns b − a in the plan's unit, or None for a flag or a name."""
        if isinstance(self.a, bool) or isinstance(self.a, str):
            return None
        return self.b - self.a


@dataclass(frozen=True)
class PlanDiff:
    """Both sides, their hashes, the fields that differ and the effects, A then B."""

    a: Side
    b: Side
    fields: tuple[FieldDiff, ...]
    effects: tuple[Effect, ...]

    @property
    def differ(self) -> bool:
        """Returns whether the plans differ at all: their `plan_sha256` (which covers every field) differs."""
        return self.a.plan.plan_sha256 != self.b.plan.plan_sha256

    def to_json(self) -> dict[str, Any]:
        """Returns the diff as JSON values: sides, hashes, fields (a side's key is left out where it lacks
        the field) and effects with their delta, in the plan's units."""
        return {
            "a": {"path": self.a.path, "kind": self.a.kind},
            "b": {"path": self.b.path, "kind": self.b.kind},
            "differ": self.differ,
            "hashes": {name: {"a": getattr(self.a.plan, name), "b": getattr(self.b.plan, name),
                              "differ": getattr(self.a.plan, name) != getattr(self.b.plan, name)}
                       for name in HASHES},
            "fields": [{"path": f.path, **{side: value for side, value in (("a", f.a), ("b", f.b))
                                           if value is not ABSENT}} for f in self.fields],
            "effects": {e.key: {"a": e.a, "b": e.b, "delta": e.delta} for e in self.effects},
        }


# key (a plan attribute path), label, display unit, divisor to that unit, format
_EFFECTS: tuple[tuple[str, str, str, float, str], ...] = (
    *((f"memory.per_gpu_bytes.{name}", name, "GiB", GIB, ",.2f") for name in (*COMPONENTS, "total")),
    ("memory.device_capacity_bytes", "capacity", "GiB", GIB, ",.2f"),
    ("memory.fits", "fits", "", 1, ""),
    ("strategy.name", "strategy", "", 1, ""),
    ("batch.nodes", "nodes", "", 1, ","),
    ("batch.world_size", "GPUs (world size)", "", 1, ","),
    ("batch.micro_batch", "micro-batch", "", 1, ","),
    ("batch.grad_accum", "grad accumulation", "", 1, ","),
    ("cost.steps", "steps", "", 1, ","),
    ("cost.step_seconds", "step time", "s", 1, ".3g"),
    ("cost.wall_seconds", "wall time", "h", 3600, ",.2f"),
    ("cost.gpu_hours", "GPU-hours", "", 1, ",.1f"),
    ("cost.usd", "cost", "USD", 1, ",.0f"),
    ("cost.kwh", "energy", "kWh", 1, ",.1f"),
)


def diff_files(a: str | Path, b: str | Path, overrides_a: tuple[str, ...] = (),
               overrides_b: tuple[str, ...] = ()) -> PlanDiff:
    """Returns the diff of A and B, each a recipe (with its `--set` overrides) or a plan.json.

    Raises DapcError (exit 2, located) for a file that is missing or is neither a valid recipe nor a plan.
    """
    return diff_plans(_side(Path(a), overrides_a, "--set-a"), _side(Path(b), overrides_b, "--set-b"))


def diff_plans(a: Side, b: Side) -> PlanDiff:
    """Returns the fields of A's and B's plans that differ, and their effects, A then B."""
    fields = tuple(_walk(a.plan.model_dump(mode="json"), b.plan.model_dump(mode="json")))
    effects = tuple(Effect(key, label, attrgetter(key)(a.plan), attrgetter(key)(b.plan))
                    for key, label, *_ in _EFFECTS)
    return PlanDiff(a, b, fields, effects)


def _side(path: Path, overrides: tuple[str, ...], flag: str) -> Side:
    if _is_plan(path):
        if overrides:
            raise DapcError(f"{flag} overrides a recipe's fields, and this is a plan.json; diff its recipe "
                            "instead", str(path))
        return Side(str(path), "plan", load_plan(path))
    from dapc.compile import compile_recipe

    return Side(str(path), "recipe", compile_recipe(path, overrides).plan)


def _is_plan(path: Path) -> bool:
    """A `.json` file is read as a plan (so a bad one gets the plan loader's error); so is any other file
    holding a JSON object with a schema_version. Everything else is a recipe."""
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PLAN_BYTES + 1)
    except (OSError, ValueError):
        return False  # the recipe loader says why it cannot be read
    if not data.lstrip().startswith(b"{"):
        return False
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False  # a YAML flow mapping, or garbage: the recipe loader says which
    return isinstance(raw, dict) and "schema_version" in raw


def _walk(a: Any, b: Any, path: str = "") -> Iterator[FieldDiff]:
    """Yields the leaves of two plans' JSON values that differ: the resolved recipe first, then the decisions,
    keys sorted as in plan.json (so a compiled plan and a loaded one walk alike). Lists of scalars are leaves; lists holding sections are walked by index
    (`recipe.eval.benchmarks[0].path`). Where one side has a section and the other a leaf (`runtime.fsdp`:
    null), the leaf's row comes first, then the section's."""
    if not (_is_section(a) or _is_section(b)):
        if a != b:
            yield FieldDiff(path, a, b)
        return
    leaf_a, leaf_b = (ABSENT if _is_section(v) else v for v in (a, b))
    if leaf_a is not ABSENT or leaf_b is not ABSENT:
        yield FieldDiff(path, leaf_a, leaf_b)
    section_a, section_b = (v if _is_section(v) else ABSENT for v in (a, b))
    keys = _keys(section_a, section_b)
    for key in sorted(keys, key=lambda k: k != "recipe") if not path else keys:  # what the user said first
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        if (not path and key in _NOT_FIELDS) or where in _NOT_FIELD_PATHS:
            continue
        yield from _walk(_at(section_a, key), _at(section_b, key), where)


def _is_section(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)) or (
        isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value))


def _keys(a: Any, b: Any) -> list[Any]:
    if isinstance(a, list) or isinstance(b, list):
        return list(range(max(len(v) if isinstance(v, list) else 0 for v in (a, b))))
    return sorted({*(a if isinstance(a, dict) else ()), *(b if isinstance(b, dict) else ())})


def _at(section: Any, key: Any) -> Any:
    if isinstance(section, dict):
        return section.get(key, ABSENT)
    if isinstance(section, list) and isinstance(key, int) and key < len(section):
        return section[key]
    return ABSENT


def diff_json_text(diff: PlanDiff) -> str:
    """Returns the diff as one JSON object: sorted keys, two-space indent, trailing newline."""
    return json.dumps(diff.to_json(), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _value_text(value: Any) -> str:
    if value is ABSENT:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return escape(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def fields_table(diff: PlanDiff) -> Table:
    """Returns the table of dotted paths whose values differ: path, A's value, B's value ("—": absent)."""
    table = Table(title="Resolved fields that differ", title_justify="left")
    longest = max((len(field.path) for field in diff.fields), default=0)
    table.add_column("field", overflow="fold", min_width=min(longest, 48))  # most paths on one line
    table.add_column("A", overflow="fold")
    table.add_column("B", overflow="fold")
    for field in diff.fields:
        table.add_row(escape(field.path), _value_text(field.a), _value_text(field.b))
    return table


def _figure(value: int | float | bool | str, divisor: float, spec: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "[red]no[/red]"
    if isinstance(value, str):
        return escape(value)
    return format(value / divisor if divisor != 1 else value, spec)


def _change(effect: Effect, divisor: float, spec: str) -> str:
    delta = effect.delta
    if delta is None:
        return "changed" if effect.a != effect.b else ""
    if delta == 0:
        return ""
    text = format(delta / divisor if divisor != 1 else delta, "+" + spec)
    if not effect.a:
        return text
    ratio = delta / effect.a
    return f"{text} ({ratio:+.1%})" if abs(ratio) < 0.1 else f"{text} ({ratio:+.0%})"


def effects_table(diff: PlanDiff) -> Table:
    """Returns what the differences change: memory per GPU (GiB), fit, strategy, batch, steps, time (s, h),
    GPU-hours, dollars and kWh, for A and B with B − A and its ratio to A."""
    table = Table(title="What it changes", title_justify="left")
    for column in ("", "A", "B", "change"):
        table.add_column(column, justify="left" if not column else "right")
    specs = {key: (unit, divisor, spec) for key, _, unit, divisor, spec in _EFFECTS}
    for effect in diff.effects:
        unit, divisor, spec = specs[effect.key]
        label = f"{effect.label} ({unit})" if unit else effect.label
        if effect.key.startswith("memory.per_gpu_bytes."):
            label = f"memory/GPU {label}"
        table.add_row(label, _figure(effect.a, divisor, spec), _figure(effect.b, divisor, spec),
                      _change(effect, divisor, spec))
    return table


def header_lines(diff: PlanDiff) -> list[str]:
    """Returns what A and B are and whether their hashes differ, one line each."""
    lines = [f"A: {escape(diff.a.path)} ({diff.a.kind})", f"B: {escape(diff.b.path)} ({diff.b.kind})"]
    for name in HASHES:
        left, right = getattr(diff.a.plan, name), getattr(diff.b.plan, name)
        verdict = f"{left[:12]} → {right[:12]}, differ" if left != right else f"{left[:12]}, same"
        lines.append(f"{name}: {verdict}")
    if not diff.fields:
        lines.append("no resolved field differs" + ("" if diff.differ else ": the plans are identical"))
    return lines


def print_diff(diff: PlanDiff, console: Console) -> None:
    """Prints the header, the fields that differ (when any) and what they change."""
    console.print("\n".join(header_lines(diff)), highlight=False)
    if diff.fields:
        console.print(fields_table(diff))
    console.print(effects_table(diff))
