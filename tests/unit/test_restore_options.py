"""One set of restore options on every surface: the CLI, restore-batch, HTTP and the Python API,
with its defaults from settings."""

from __future__ import annotations

import argparse

import pytest

from pfstorer.cli import build_parser
from pfstorer.errors import ParameterError
from pfstorer.restore_options import RestoreOptions
from pfstorer.settings import Settings
from serving.api import RestoreParams

FIELDS = set(RestoreOptions.model_fields)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _flags(p: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in p._actions}


def test_every_option_is_a_flag_of_restore_and_restore_batch() -> None:
    from pipelines.cli import register_cli

    parser = build_parser(plugins=False)
    assert FIELDS <= _flags(_subparser(parser, "restore"))
    top = argparse.ArgumentParser()
    register_cli(top.add_subparsers())
    assert FIELDS <= _flags(_subparser(top, "restore-batch"))


def test_http_form_fields_are_the_options_plus_who_and_how_to_encode() -> None:
    assert set(RestoreParams.model_fields) == FIELDS | {"identity", "format", "quality"}
    with pytest.raises(ValueError):  # the server's tiles: not a request's to choose
        RestoreParams(tile=64)


def test_settings_give_the_cli_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFSTORER_RESTORE__SEED", "7")
    monkeypatch.setenv("PFSTORER_RESTORE__COLOR_FIX", "adain")
    args = build_parser(plugins=False).parse_args(["restore", "--input", "a.png", "--out", "b.png", "--scale", "2"])
    options = RestoreOptions.from_args(args, Settings.load().restore)
    assert (options.seed, options.color_fix, options.scale) == (7, "adain", 2.0)  # a flag wins over settings
    assert options.steps is None  # unset: the base's own default


def test_http_fields_left_out_take_the_servers_defaults() -> None:
    defaults = RestoreOptions(seed=3, color_fix="none", scale=2)
    options = RestoreParams.model_validate({"seed": "5"}).options(defaults)
    assert (options.seed, options.color_fix, options.scale) == (5, "none", 2.0)
    # a field given with the built-in default's value still wins
    assert RestoreParams.model_validate({"scale": "1"}).options(defaults).scale == 1.0


def test_an_out_of_range_option_names_the_field() -> None:
    with pytest.raises(ParameterError, match="strength"):
        RestoreOptions.merged(strength=1.5)
    with pytest.raises(ParameterError, match="scale"):
        RestoreOptions.merged(RestoreOptions(seed=2), scale=0)


def test_python_api_keywords_override_the_options() -> None:
    import torch

    from pfstorer.model import load_base
    from pfstorer.sampling import restore

    model = load_base("tiny", device="cpu")
    image = torch.rand(3, 32, 32)
    a = restore(model, image, options=RestoreOptions(steps=2, seed=1, scale=2))
    b = restore(model, image, steps=2, seed=1, scale=2)
    c = restore(model, image, options=RestoreOptions(steps=2, seed=9, scale=2), seed=1)
    assert a.shape == (3, 64, 64)
    assert torch.equal(a, b) and torch.equal(a, c)
