# The README's command table and option list say what the CLI does: every command it names exists, every flag it
# shows is one of that command's, and every value it lists for a flag with fixed choices is one of those choices.
from __future__ import annotations

import argparse
import re
from pathlib import Path

from tinygptv.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
FLAG = re.compile(r"(--[a-z][a-z0-9-]*)(?:[ =]([A-Za-z0-9_.:|\\-]+))?")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def table_rows() -> list[str]:
    section = README.split("## The command", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `tinygptv ")]


def test_every_command_in_the_readme_table_exists_with_its_flags():
    commands = subparsers()
    rows = table_rows()
    assert len(rows) >= 10
    for row in rows:
        usage = row.split("`")[1].replace("\\|", "|")  # the first cell's code: tinygptv CMD [args]
        name = usage.split()[1]
        assert name in commands, f"README names `tinygptv {name}`, which is not a command"
        parser = commands[name]
        if name == "eval" and usage.split()[2:3] == ["score"]:
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["score"]
        known = options(parser)
        for flag, _ in FLAG.findall(usage):
            assert flag in known, f"README shows `{flag}` for `tinygptv {name}`, which has no such option"


def test_the_inference_options_the_readme_lists_are_the_clis():
    paragraph = README.split("Inference options", 1)[1].split("\n\n", 1)[0]
    ask = options(subparsers()["ask"])
    listed = re.findall(r"`(--[a-z][a-z0-9-]*)(?: ([^`]+))?`", paragraph)
    assert len(listed) >= 12
    for flag, values in listed:
        assert flag in ask, f"README lists `{flag}`, which `tinygptv ask` does not have"
        if values and "|" in values and ask[flag].choices is not None:
            for value in values.split("|"):
                if value != "cuda:N":
                    assert value in ask[flag].choices, f"README lists `{flag} {value}`, not one of its choices"
    # and the other way: every decoding and precision option of ask is documented there
    documented = {flag for flag, _ in listed}
    for action in subparsers()["ask"]._actions:
        long = [f for f in action.option_strings if f.startswith("--")]
        if long and long[0] not in ("--help", "--image", "--no-stream", "--draw") and long[0] not in documented:
            raise AssertionError(f"`tinygptv ask {long[0]}` is not in the README's list of inference options")
