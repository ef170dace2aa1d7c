"""Every flag of the two user-facing commands says what it does in --help, and its default where it has one."""
import argparse

import pytest

import sample
import train_flags


@pytest.mark.parametrize("parser", [train_flags.build_parser(), sample._parser()], ids=["train", "sample"])
def test_every_flag_is_documented(parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings} has no help text"
        if action.default not in (None, False) and action.option_strings:
            assert "default" in formatter._get_help_string(action), f"{action.option_strings}: default not shown"
