"""Every command explains itself: ``--version``, defaults in ``--help``, help text for every
argument of ``smi-hub`` and of the training commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

import smi_hub
from smi_hub import cli
from smi_hub.cli_format import missing_help
from training import evaluate, finetune, pretrain

PARSERS = {
    "smi-hub": cli.build_parser,
    "training.pretrain": pretrain.build_parser,
    "training.evaluate": evaluate.build_parser,
    "training.finetune": finetune.build_parser,
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_argument_has_help_text(name):
    assert missing_help(PARSERS[name]()) == []


def test_the_walker_finds_an_argument_without_help():
    parser = cli.build_parser()
    before = missing_help(parser)
    parser._subparsers._group_actions[0].choices["info"].add_argument("--undocumented")
    assert missing_help(parser) == [*before, "smi-hub info: --undocumented"]


def test_version_exits_0_with_the_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"smi-hub {smi_hub.__version__}"


@pytest.mark.slow
def test_version_of_the_installed_command():
    out = subprocess.run(
        [sys.executable, "-m", "smi_hub.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and smi_hub.__version__ in out.stdout


def _help(parser, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--help"])
    return ""


@pytest.mark.parametrize(
    ("name", "argv", "expected"),
    [
        ("smi-hub", ["search"], "(default: 5)"),
        ("smi-hub", ["index"], "(default: 2GB)"),
        ("smi-hub", ["extract"], "(default: 64)"),
        ("smi-hub", ["extract"], "worker processes (default: 0)"),
        ("training.finetune", [], "(default: 0.05)"),
        ("training.evaluate", [], "(default: 0.07)"),
    ],
)
def test_help_shows_defaults(name, argv, expected, capsys):
    _help(PARSERS[name](), argv)
    out = capsys.readouterr().out
    assert expected in out
    assert "(default: None)" not in out and "(default: False)" not in out


@pytest.mark.parametrize(
    ("module", "expected"),
    [("geometry", "(default: 2000)"), ("report", "(default: main)"), ("plots", "--labels")],
)
def test_the_other_training_commands_show_defaults_and_help(module, expected, capsys):
    import importlib

    main = importlib.import_module(f"training.{module}").main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert expected in out
