"""Help texts speak of the command they belong to."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from normstats.cli import cli

OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)")
OTHER_COMMAND = re.compile(r"\b(fit-bn|fit-centers|apply|merge|export|import|inspect|assign)\s+(--[a-z][a-z-]*)")


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_option_help_names_only_the_commands_own_options(name: str) -> None:
    """An option's help may point to another of the command's options, or to another
    command's ('fit-bn --groups'), never to an option the command lacks."""
    command = cli.commands[name]
    own = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    for param in command.params:
        text = getattr(param, "help", None) or ""
        elsewhere = {match.group(2) for match in OTHER_COMMAND.finditer(text) if match.group(1) != name}
        foreign = set(OPTION.findall(text)) - own - elsewhere
        assert not foreign, f"normstats {name} {param.opts[0]}: its help names {sorted(foreign)}"


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_none_value_is_explained(name: str) -> None:
    text = CliRunner().invoke(cli, [name, "--help"], terminal_width=200).output
    for line in text.splitlines():
        if re.search(r"\|NONE\b", line):
            assert re.search(r"'none'\s*(\(|to\b|is\b|drops|disables)", line), line
