"""What every script in scripts/ shares: turn user errors into one line on stderr and exit code 2.

Scripts stay thin (STYLE.md, "Thin scripts"): they parse arguments and call one function of `pipelines/`
through `run_main`. Errors a user can fix (bad paths, bad values, missing weights) surface as one line (exit
2); so do a full disk, a diverged loss and a failed checkpoint write (exit 1). Set EPSVAE_DEBUG=1 to get the full
traceback instead.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable, Sequence

USER_ERROR_EXIT_CODE = 2

# Exceptions that mean "the input is wrong", not "the code is wrong".
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,  # a file where a directory belongs
    PermissionError,
    KeyError,
)


def _extra_user_errors() -> tuple[type[BaseException], ...]:
    """Project exceptions that are user errors too, imported lazily to keep script start-up fast."""
    extra: list[type[BaseException]] = []
    try:
        from tokenizer.perceptual import MissingWeightsError

        extra.append(MissingWeightsError)
    except ImportError:  # pragma: no cover - module is part of the package
        pass
    return tuple(extra)


RUN_FAILURE_EXIT_CODE = 1


def _is_run_failure(error: BaseException) -> bool:
    """Failures that are neither bad input nor a bug: a full disk, a diverged loss, a checkpoint that could not be
    written. They get one line too (their messages say what happened and what was kept), with exit code 1."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    from pipelines.kit.checkpoints import CheckpointError
    from pipelines.kit.loop import NonFiniteLossError

    return isinstance(error, (CheckpointError, NonFiniteLossError))


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original message is the last line
        text = text.splitlines()[-1]
    message = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, KeyError):
        message = f"missing key {message}"
    return message


def _report(error: BaseException) -> None:
    """`error: <one line>` on a line of its own: a progress bar the error interrupted is closed first."""
    tqdm_module = sys.modules.get("tqdm.std")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()
    print(f"error: {one_line(error)}", file=sys.stderr)


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a script's `main(argv)`; user errors → `error: <one line>` on stderr, exit 2 (run failures: exit 1)."""
    try:
        main(argv)
    except (*USER_ERRORS, *_extra_user_errors()) as error:
        if os.environ.get("EPSVAE_DEBUG"):
            raise
        _report(error)
        return USER_ERROR_EXIT_CODE
    except Exception as error:  # noqa: BLE001 - re-raised unless it is a run failure
        if os.environ.get("EPSVAE_DEBUG") or not _is_run_failure(error):
            raise
        _report(error)
        return RUN_FAILURE_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: the newest complete checkpoint is kept; rerun with --resume auto", file=sys.stderr)
        return 130
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's exit code for bad arguments (2, one line, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USER_ERROR_EXIT_CODE, f"error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text}")


def _optional(convert: Callable[[str], object]) -> Callable[[str], object]:
    def parse(text: str) -> object:
        return None if text.lower() in ("none", "null", "") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: Sequence[str] = (),
                         choices: dict[str, Sequence[str]] | None = None, defaults: object = None) -> None:
    """One `--field-name` flag per field of a frozen config dataclass, typed from its annotation.

    A field that is itself a config dataclass (a section of a nested config: `model`, `optim`, `run`, ...) is
    recursed into, so its fields get flags of their own names (`--lr`, not `--optim-lr`); the help shows the
    defaults of the enclosing config (its `default_factory`). Defaults stay in the dataclasses (one source of
    truth); flags left out are not passed, so `config_from_arguments` only overrides what the user typed.
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    choices = choices or {}
    for item in dataclasses.fields(config_class):
        if item.name in skip:
            continue
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            section_defaults = getattr(defaults, item.name) if defaults is not None else (
                item.default_factory() if item.default_factory is not dataclasses.MISSING else None)
            add_config_arguments(parser, hint, skip, choices, section_defaults)
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        base = args[0] if optional and args else hint
        origin = typing.get_origin(base)
        flag = "--" + item.name.replace("_", "-")
        kwargs: dict = {"dest": item.name, "default": argparse.SUPPRESS}
        if item.name in choices:
            kwargs["choices"] = list(choices[item.name])
        if origin is tuple:
            element = typing.get_args(base)[0]
            kwargs.update(type=element, nargs=len(typing.get_args(base)) if ... not in typing.get_args(base) else "+")
        elif base is bool:
            kwargs["type"] = _parse_bool
        elif base in (int, float, str):
            kwargs["type"] = _optional(base) if optional else base
        else:
            continue  # dicts get dedicated flags in the script
        if defaults is not None:
            default = getattr(defaults, item.name)
        else:
            default = item.default if item.default is not dataclasses.MISSING else None
        parser.add_argument(flag, help=f"(default: {default})", **kwargs)


def _leaf_names(config_class: type) -> set[str]:
    """Field names of a config dataclass, those of its section dataclasses in place of the sections."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    names: set[str] = set()
    for item in dataclasses.fields(config_class):
        hint = hints[item.name]
        names |= _leaf_names(hint) if dataclasses.is_dataclass(hint) else {item.name}
    return names


def config_from_arguments(config_class: type, namespace: argparse.Namespace, **extra):
    """Build the config from the flags the user gave plus `extra`; the dataclass validates the values. A nested
    config (`SectionedConfig`) is built with `from_flat`, which routes each flag to its section."""
    names = _leaf_names(config_class)
    values = {k: v for k, v in vars(namespace).items() if k in names}
    values.update(extra)
    from_flat = getattr(config_class, "from_flat", None)
    return from_flat(**values) if from_flat is not None else config_class(**values)


def add_override_arguments(parser: argparse.ArgumentParser, flags: dict[str, tuple[type, str]], title: str) -> None:
    """Flags collected into a config's `model_overrides` dict (`flags`: name → (type, help))."""
    group = parser.add_argument_group(title)
    for name, (kind, help_text) in flags.items():
        group.add_argument("--" + name.replace("_", "-"), dest="override_" + name, type=kind, help=help_text)


def collect_overrides(namespace: argparse.Namespace, flags: dict[str, tuple[type, str]]) -> dict[str, object]:
    """The override flags the user actually gave."""
    return {name: getattr(namespace, "override_" + name) for name in flags
            if getattr(namespace, "override_" + name, None) is not None}


def training_parser(description: str, config_class: type, choices: dict[str, Sequence[str]],
                    override_flags: dict[str, tuple[type, str]], override_title: str) -> ArgumentParser:
    """A trainer's parser: one flag per config field (precision choices from the one registry) plus the model
    override flags collected into `model_overrides`."""
    from pipelines.kit.precision import PRECISIONS

    parser = ArgumentParser(description=description)
    add_config_arguments(parser, config_class, choices={"precision": list(PRECISIONS), **choices})
    add_override_arguments(parser, override_flags, override_title)
    return parser


def training_config(config_class: type, namespace: argparse.Namespace, override_flags: dict[str, tuple[type, str]]):
    """The trainer's config from its parsed flags, the model overrides included."""
    return config_from_arguments(config_class, namespace, model_overrides=collect_overrides(namespace, override_flags))
