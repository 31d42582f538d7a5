"""The GPU measurement scripts (benchmarks/*.sh) checked on a machine
without a GPU, before they spend a lent GPU's minutes (15 a session): each
parses as bash, every test they name exists, and every option they hand a
Python script is one that script's ``--help`` lists. Session 11 lost most of
a GPU test step to a ``-k`` expression that matched a parent folder's name;
a renamed test or option would fail there the same silent way."""

import functools
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.sh"))
# What the scripts run with Python: a file of benchmarks/ or a module of the package.
TARGET = re.compile(r"(benchmarks/[A-Za-z_]+\.py|-m (fused_preact\.[A-Za-z_]+))")


def _logical_lines(text: str) -> list[str]:
    """The script's commands, one a string: backslash continuations and
    lines inside an open parenthesis (a bash array, a $(...)) joined."""
    lines, pending, depth = [], "", 0
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0] if not raw.lstrip().startswith("#") else ""
        pending += " " + line.rstrip("\\")
        depth += line.count("(") - line.count(")")
        if not line.endswith("\\") and depth <= 0:
            lines.append(pending.strip())
            pending, depth = "", 0
    return [line for line in lines if line]


def _target_options(script: pathlib.Path) -> dict[str, set[str]]:
    """{target: options the script passes it}: the --options after each
    mention of a target on its command line, and after each expansion of a
    bash array that holds one (BENCH=(... -m fused_preact.bench ...))."""
    lines = _logical_lines(script.read_text())
    arrays = {}
    for line in lines:
        m = re.match(r"([A-Z_]+)=\((.*)\)$", line)
        if m and TARGET.search(m.group(2)):
            found = TARGET.search(m.group(2))
            arrays[m.group(1)] = found.group(2) or found.group(1)
    options: dict[str, set[str]] = {}
    for line in lines:
        mentions = [(m.end(), m.group(2) or m.group(1)) for m in TARGET.finditer(line)]
        mentions += [(m.end(), arrays[m.group(1)]) for m in re.finditer(r"\$\{([A-Z_]+)\[@\]\}", line)
                     if m.group(1) in arrays]
        for end, target in mentions:
            # this command's words: up to a redirection, pipe, list operator or the array's end
            words = re.split(r"\s(?:>|>>|2>|\||&&|\|\||;)\s|\)$", line[end:] + " ", maxsplit=1)[0]
            options.setdefault(target, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", words))
    return options


@functools.lru_cache(maxsize=None)
def _help(target: str) -> str:
    command = ["-m", target] if target.startswith("fused_preact.") else [str(ROOT / target)]
    out = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{target} --help failed: {out.stderr[-2000:]}"
    return out.stdout


def test_the_scripts_are_found():
    assert {p.name for p in SCRIPTS} >= {"gpu_units.sh", "gpu_tma_check.sh", "gpu_common.sh"}
    assert _target_options(ROOT / "benchmarks" / "gpu_units.sh")["fused_preact.bench"] >= {"--warm-only", "--units"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_as_bash(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _test_names(path: pathlib.Path) -> set[str]:
    return set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_named_tests_exist(script):
    """Node ids (tests/x.py::test_y) and the TESTS list of test function
    names (gpu_units.sh) name tests that exist."""
    text = script.read_text()
    for path, name in re.findall(r"(tests/\w+\.py)::(\w+)", text):
        assert name in _test_names(ROOT / path), f"{script.name}: {path}::{name} does not exist"
    listed = re.search(r'^TESTS=\$\{TESTS:-"(.*?)"\}', text, re.S | re.M)
    if listed:
        missing = set(listed.group(1).split()) - _test_names(ROOT / "tests" / "test_triton.py")
        assert not missing, f"{script.name}: TESTS names tests that do not exist: {sorted(missing)}"


CASES = [(script, target) for script in SCRIPTS for target in sorted(_target_options(script))]


@pytest.mark.parametrize("script, target", CASES, ids=[f"{s.name}-{t}" for s, t in CASES])
def test_options_handed_to_python_scripts_exist(script, target):
    listed = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _help(target)))
    unknown = _target_options(script)[target] - listed
    assert not unknown, f"{script.name} passes {target} options its --help does not list: {sorted(unknown)}"
