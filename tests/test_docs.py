"""README stays true: its commands run and print what it shows, and CI runs its set-up."""

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

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TIMING = re.compile(r"\d+\.\d\d s, [\d,]+ rows/s, \d+\.\d\d GB/s")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _console_examples() -> list[tuple[str, str]]:
    """(command, expected output) pairs from the README's console blocks."""
    examples = []
    for block in _blocks("console"):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, output = chunk.partition("\n")
            examples.append((command, output))
    return examples


def _normstats() -> str:
    script = Path(sys.executable).with_name("normstats")
    return str(script) if script.exists() else shutil.which("normstats")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "sample_data", folder / "sample_data")
    return folder


def test_readme_has_examples() -> None:
    assert len(_console_examples()) >= 3
    assert _blocks("python")


@pytest.mark.parametrize("command, expected", _console_examples(), ids=lambda v: v[:40])
def test_console_example_prints_what_readme_shows(workdir: Path, command: str, expected: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "normstats"
    result = subprocess.run(
        [_normstats(), *argv[1:]], cwd=workdir, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert TIMING.sub("T", result.stdout) == TIMING.sub("T", expected)
    assert result.stderr == ""


def test_python_example_runs_and_prints_what_readme_shows(workdir: Path) -> None:
    source = _blocks("python")[0]
    expected = [line.split("# ")[1] for line in source.splitlines() if line.startswith("print(")]
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(workdir)
        with contextlib.redirect_stdout(out):
            exec(compile(source, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert out.getvalue().splitlines() == expected
    assert (workdir / "random.npz").exists()


def test_ci_runs_the_readme_setup_and_test_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup, test = [block.strip() for block in _blocks("sh")[:2]]
    assert setup in ci
    assert test in ci
