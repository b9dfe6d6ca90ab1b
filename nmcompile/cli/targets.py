"""Loading a TARGET and parsing ``--options`` for the CLI.

A TARGET is a built-in example name (``mlp``, ``cnn``, ``gpt``) or ``FILE.py:FACTORY`` /
``package.module:FACTORY`` where ``FACTORY()`` returns ``(model, example_inputs)``.
"""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
from typing import Callable, Optional

import torch

from nmcompile.capture import one_line
from nmcompile.cli.errors import CLIError
from nmcompile.passes.config import NMConfig
from nmcompile.recipes import options_from_text, recipe

DEFAULT_OPTIONS = recipe("mvue 2:4").options  # {"sparsity": "2:4"}


def load_target(spec: str) -> tuple[torch.nn.Module, tuple]:
    from nmcompile.examples import EXAMPLES

    if spec in EXAMPLES:
        factory, where = EXAMPLES[spec][0], f"built-in example {spec!r}"
    else:
        factory, where = _load_factory(spec), spec
    try:
        result = factory()
    except Exception as err:
        raise CLIError(f"{where}: the factory raised {type(err).__name__}: {one_line(err)}") from err
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise CLIError(f"{where}: the factory must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise CLIError(f"{where}: example_inputs must be a tuple of inputs, got {type(inputs).__name__}")
    return model, tuple(inputs)


def _load_factory(spec: str) -> Callable:
    from nmcompile.examples import EXAMPLES

    if ":" not in spec:
        raise CLIError(f"unknown target {spec!r}: use a built-in example ({', '.join(EXAMPLES)}) or FILE.py:FACTORY")
    where, name = spec.rsplit(":", 1)
    if not where or not name:
        raise CLIError(f"target {spec!r}: expected FILE.py:FACTORY")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = pathlib.Path(where)
        if not path.is_file():
            raise CLIError(f"target file {where!r} does not exist")
        module_name = f"_nmcompile_target_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            raise CLIError(f"importing {where!r} failed: {type(err).__name__}: {one_line(err)}") from err
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:
            raise CLIError(f"cannot import module {where!r}: {type(err).__name__}: {one_line(err)}") from err
    factory = getattr(module, name, None)
    if factory is None:
        raise CLIError(f"{where!r} has no factory {name!r}")
    if not callable(factory):
        raise CLIError(f"{where}:{name} is not callable")
    return factory


def parse_options(text: Optional[str], defaults: Optional[dict] = None) -> tuple[dict, NMConfig]:
    """``--options`` JSON or a recipe's name -> (backend options, the NMConfig they give) (default
    ``{"sparsity": "2:4"}``); ``defaults`` are added, after the user's keys, where the user gave none."""
    if text is None:
        options = dict(DEFAULT_OPTIONS)
    else:
        try:
            options = options_from_text(text, "--options")
        except ValueError as err:
            raise CLIError(str(err)) from err
    options = {**options, **{k: v for k, v in (defaults or {}).items() if k not in options}}
    try:
        config, _ = NMConfig.from_options(options)
    except (ValueError, TypeError) as err:
        raise CLIError(f"bad option: {one_line(err)}") from err
    return options, config
