"""README stays true: its examples run, in order, and print what it shows; CI runs its set-up.

Console blocks hold ``$ normstats ...`` lines followed by their output (stdout,
or the ``Error: ...`` line on stderr for a failing example); python blocks are
executed, and a ``print(...)  # text`` line must print that text. Timings in
summary lines are masked. A python block that imports a toolkit normstats
exports to (torch, keras, kaldiio) runs where that toolkit is installed and is
skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from normstats.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TIMING = re.compile(r"\d+\.\d\d s, [\d,]+ rows/s, \d+\.\d\d GB/s")
TOOLKITS = ("torch", "keras", "kaldiio")  # optional: the README shows how to load exports into them
BLOCK = re.compile(r"```(\w+)\n(.*?)```", flags=re.S)
# README's console lines run in this process, through the same click group as the console script
# (tests/test_cli.py runs the installed script itself): the same output and exit code without a
# fresh interpreter and kernel load per line. Lines that start worker processes run the script.
SUBPROCESS_OPTIONS = {"--engine", "--jobs"}


def _blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README) if lang == language]


def _examples() -> list[tuple[str, str, str]]:
    """(kind, code, expected output) for every runnable example, in README order."""
    examples = []
    for language, body in BLOCK.findall(README):
        if language == "python":
            examples.append(("python", body, ""))
        elif language == "console":
            for chunk in re.split(r"^\$ ", body, flags=re.M)[1:]:
                command, _, output = chunk.partition("\n")
                examples.append(("console", command, output))
    return examples


def _normstats() -> str:
    script = Path(sys.executable).with_name("normstats")
    return str(script) if script.exists() else shutil.which("normstats")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout's folder after README's set-up line ran in it: the examples must work from
    there as written (the set-up's own normstats run must not take their file names)."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "sample_data", folder / "sample_data")
    (folder / ".venv").mkdir()
    setup = _blocks("sh")[0].strip()
    for step in setup.split(" && "):
        argv = shlex.split(step)
        if argv[0].endswith("/normstats"):
            subprocess.run([_normstats(), *argv[1:]], cwd=folder, check=True, capture_output=True)
    return folder


def test_readme_has_examples() -> None:
    kinds = [kind for kind, _, _ in _examples()]
    assert kinds.count("console") >= 3 and "python" in kinds


@pytest.mark.parametrize("kind, code, expected", _examples(), ids=lambda v: v[:50])
def test_readme_example(workdir: Path, kind: str, code: str, expected: str, runner: CliRunner) -> None:
    if kind == "python":
        _run_python(workdir, code)
    else:
        _run_console(workdir, code, expected, runner)


def _run_console(workdir: Path, command: str, expected: str, runner: CliRunner) -> None:
    argv = shlex.split(command)
    assert argv[0] == "normstats"
    if SUBPROCESS_OPTIONS & set(argv):
        done = subprocess.run([_normstats(), *argv[1:]], cwd=workdir, capture_output=True, text=True, timeout=120)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    else:
        code, stdout, stderr = _invoke(runner, workdir, argv[1:])
    if expected.startswith("Error:"):
        assert code != 0
        assert stdout == ""
        assert stderr == expected
    else:
        assert code == 0, stderr
        assert TIMING.sub("T", stdout) == TIMING.sub("T", expected)
        assert stderr == ""


def _invoke(runner: CliRunner, workdir: Path, args: list[str]) -> tuple[int, str, str]:
    """Run the command in this process from `workdir`, as the console script would."""
    cwd = os.getcwd()
    try:
        os.chdir(workdir)
        result = runner.invoke(cli, args, prog_name="normstats")
    finally:
        os.chdir(cwd)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # the script would have printed a traceback
    return result.exit_code, result.stdout, result.stderr


def _imported(source: str) -> set[str]:
    """Top-level modules that `source` imports."""
    names = set()
    for line in source.splitlines():
        if line.startswith("import "):
            names.update(part.split()[0].split(".")[0] for part in line[len("import "):].split(","))
        elif line.startswith("from "):
            names.add(line.split()[1].split(".")[0])
    return names


def _run_python(workdir: Path, source: str) -> None:
    for toolkit in sorted(_imported(source) & set(TOOLKITS)):
        pytest.importorskip(toolkit)
    expected = [line.split("# ", 1)[1] for line in source.splitlines() if line.startswith("print(")]
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(workdir)
        with contextlib.redirect_stdout(out):
            exec(compile(source, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert out.getvalue().splitlines() == expected


def test_ci_runs_the_readme_setup_and_test_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup, test = [block.strip() for block in _blocks("sh")[:2]]
    assert setup in ci
    assert test in ci
