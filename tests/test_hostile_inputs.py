"""Hostile and odd inputs: always one located `error:` line and exit 2, never a traceback or a hang."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _bomb() -> str:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(8):
        prev, name = chr(97 + i), chr(98 + i)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


CASES = {
    "non-utf8": (b'name: x\nmodel: {source: "\xff\xfe"}\n', ":2:18: not UTF-8 text (byte 0xff)"),
    "control-char": (b"name: x\x07\n", ":1:8: invalid YAML: character #x0007 is not allowed"),
    "alias-bomb": (_bomb().encode(), ": recipe expands to more than 100,000 YAML nodes (aliases?)"),
    "deep": (b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n", ": recipe nested too deeply"),
    "sequence-key": (b"? [a, b]\n: 1\n", ":1:3: a mapping key must be a plain value, not a list or mapping"),
    "huge": (b"# " + b"x" * (1024 * 1024 + 10) + b"\n", ": recipe larger than 1024 KiB"),
}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dapc", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


def _one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    return done.stderr.rstrip("\n")


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_recipe_gives_one_located_line(tmp_path: Path, name: str):
    text, expected = CASES[name]
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text)
    assert _one_line(_run("validate", str(path))) == f"error: {path}{expected}"


def test_devices_folders_and_symlink_loops_are_not_recipes(tmp_path: Path):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    assert _one_line(_run("validate", "/dev/zero")) == "error: /dev/zero: not a regular file"
    assert _one_line(_run("validate", str(tmp_path))) == f"error: {tmp_path}: not a regular file"
    assert _one_line(_run("validate", str(tmp_path / "a.yaml"))).startswith(f"error: {tmp_path / 'a.yaml'}: ")


def test_usage_mistakes_are_one_line():
    assert _one_line(_run("plan", "--bogus", "x")) == "error: dapc plan: No such option '--bogus'. (see dapc plan --help)"
    assert _one_line(_run("plan")) == "error: dapc plan: Missing argument 'RECIPE'. (see dapc plan --help)"


@pytest.mark.parametrize(("override", "message"), [
    ("launch.namespace=Prod", "launch.namespace: string should match pattern '^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$' "
                              "(got 'Prod')"),
    ("launch.slurm.time=２４:00:00", "launch.slurm.time: string should match pattern "
                                    "'^([0-9]+-)?[0-9]{1,3}:[0-9]{2}:[0-9]{2}$' (got '２４:00:00')"),
    ('launch.env={"plan": "x"}', "launch.env: value error, 'plan' is set by the rendered launch scripts or torchrun; "
                                 "choose another name"),
    ('launch.env={"A": "x\\ny"}', "launch.env: value error, the value of A holds a control character"),
    ("hardware.gpu_memory_gib=.inf", "hardware.gpu_memory_gib: input should be a finite number (got inf)"),
], ids=["k8s-namespace", "full-width-digits", "script-variable", "control-character", "infinite"])
def test_values_other_tools_reject_are_refused_at_the_recipe(override: str, message: str):
    recipe = str(REPO / "examples" / "tiny" / "recipe.yaml")
    assert _one_line(_run("validate", recipe, "--set", override)) == f"error: --set {override}: {message}"


def test_kubernetes_names_are_rfc1123_labels():
    from dapc.render import _k8s_name

    assert _k8s_name("My_Run.v2") == "my-run-v2"
    assert _k8s_name("a" * 49 + "-b") == "a" * 49  # cut at 50, no '-' left at the end
    assert _k8s_name("___") == "dapc"


def test_a_full_stdout_is_one_line_not_a_traceback():
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "dapc", "plan", str(REPO / "examples" / "tiny" / "recipe.yaml")],
                              cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (2, "error: cannot write the output: No space left on device\n")
