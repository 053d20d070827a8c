"""One argparse style for every command of the project (``smi-hub`` and ``python -m
training.*``): ``--help`` shows each option's default, and every argument has help text
(``missing_help`` finds one that has none; a test walks every parser with it)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's defaults formatter, keeping descriptions' line breaks and not appending a
    default that says nothing (None, False, an empty list) or that the help already names."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        silent = (
            default is None or default is False or default == [] or default == argparse.SUPPRESS
        )
        if silent or "default" in text.lower():
            return text
        return super()._get_help_string(action) or text


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``HelpFormatter``; its sub-parsers get it too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def missing_help(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Names of the arguments of ``parser`` and all its sub-parsers that have no help text
    (``prefix`` names the parser in the result)."""
    name = prefix or parser.prog
    missing: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                missing += missing_help(sub, f"{name} {sub_name}")
        elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
            missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    return missing
