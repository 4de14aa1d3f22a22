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

    return isinstance(error, (CheckpointError, NonFiniteLossError)) or _lost_peer(error) is not None


def _lost_peer(error: BaseException) -> str | None:
    """The one line for a collective that failed because another rank died or hung (gloo / NCCL errors), else
    None. The newest complete checkpoint is what a rerun resumes from."""
    import torch.distributed

    distributed_errors = tuple(getattr(torch.distributed, name) for name in ("DistError",)
                               if hasattr(torch.distributed, name))
    text = str(error).lower()
    timed_out = "timed out" in text or "timeout" in text
    lost = any(marker in text for marker in ("connection closed by peer", "connection reset", "broken pipe",
                                             "communicator was aborted"))
    if not (isinstance(error, distributed_errors) or (isinstance(error, RuntimeError) and (timed_out or lost))):
        return None
    what = ("timed out waiting for another process (a hung or overloaded rank; see --collective-timeout-s)"
            if timed_out else "lost the connection to another process (a rank died)")
    return f"a collective operation {what}; rerun with --resume auto to continue from the newest checkpoint"


def one_line(error: BaseException) -> str:
    lost = _lost_peer(error) if isinstance(error, RuntimeError) else None
    if lost is not None:
        return lost
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
    _write_line(f"error: {one_line(error)}")


def _write_line(text: str) -> None:
    """One write of the whole line: under `accelerate launch` every rank shares the launcher's stderr, and a line
    printed in pieces can interleave with another rank's (two errors fused into one line)."""
    sys.stderr.flush()
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (pytest, notebooks) has no descriptor
        print(text, file=sys.stderr)
        return
    os.write(descriptor, (text + "\n").encode("utf-8", "replace"))


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a script's `main(argv)`; user errors → `error: <one line>` on stderr, exit 2 (run failures: exit 1)."""
    from pipelines.kit.allocator import keep_freed_memory

    keep_freed_memory()  # CPU steps reuse their freed activations instead of faulting fresh pages in
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
        _write_line("interrupted: the newest complete checkpoint is kept; rerun with --resume auto")
        return 130
    try:
        from pipelines.kit.run import close_process_group

        close_process_group()
    except Exception as error:  # noqa: BLE001 - the job's outputs are written; a failed teardown is one line
        if os.environ.get("EPSVAE_DEBUG"):
            raise
        _report(error)
        return RUN_FAILURE_EXIT_CODE
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's exit code for bad arguments (2, one line, no usage dump); the Examples of a
    script's docstring are kept as written (RawDescriptionHelpFormatter)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

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


def script_parser(doc: str, parser_class: type = ArgumentParser, **kwargs) -> ArgumentParser:
    """A script's parser: the docstring's first line as description, the rest (Examples) as the help's epilog, and
    `--config FILE`."""
    first, _, rest = doc.strip().partition("\n")
    parser = parser_class(description=first, epilog=rest.strip("\n") or None, **kwargs)
    add_config_file_argument(parser)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# The vocabulary: one name per idea in every script (README, "Flags"). Old spellings stay as hidden aliases that
# print a one-line deprecation warning.
# ---------------------------------------------------------------------------------------------------------------

OUTPUT_DIR_FLAG = "--output-dir"
GLOBAL_BATCH_FLAG = "--global-batch-size"  # trainers: micro-batch × processes × grad_accum
PER_PROCESS_BATCH_FLAG = "--per-process-batch-size"  # sampling, caching, evaluation, benchmarks
GLOBAL_BATCH_HELP = "images per optimiser step over all processes (= per-process micro-batch × processes × grad_accum)"
PER_PROCESS_BATCH_HELP = "images per forward pass on each process (the global batch is this × processes)"


def warn_deprecated(old: str, new: str) -> None:
    _write_line(f"warning: {old} is deprecated and will be removed in the next release; use {new}")


class _DeprecatedStore(argparse.Action):
    """A hidden old spelling of a flag: stores into the new flag's dest after a one-line warning."""

    def __init__(self, option_strings, dest, new_flag: str = "", **kwargs) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_deprecated(option_string, self.new_flag)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs) -> None:
    """`old` keeps working for one release (hidden from --help) and means what `new` means."""
    parser.add_argument(old, dest=dest, action=_DeprecatedStore, new_flag=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)


class BoolFlag(argparse.Action):
    """`--flag` / `--no-flag` (like argparse.BooleanOptionalAction). The old spelling with a value (`--cpu true`)
    still works for one release, with a warning: `parse_arguments` rewrites it before parsing."""

    def __init__(self, option_strings, dest, default=argparse.SUPPRESS, help=None, **kwargs) -> None:
        names = []
        for option in option_strings:
            names.append(option)
            if option.startswith("--"):
                names.append("--no-" + option[2:])
        super().__init__(names, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, not option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def _rewrite_old_booleans(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--cpu true` → `--cpu`, `--verify false` → `--no-verify` (with a deprecation warning)."""
    flags = {option for action in parser._actions if isinstance(action, BoolFlag)
             for option in action.option_strings if not option.startswith("--no-")}
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        name, _, inline = token.partition("=")
        if name in flags and (inline or (index + 1 < len(argv) and not argv[index + 1].startswith("-"))):
            word = inline or argv[index + 1]
            if word.lower() not in _BOOL_WORDS:
                parser.error(f"argument {name}: takes no value ({name} / --no-{name[2:]}; old spelling: "
                             f"true/false), got {word}")
            new = name if _parse_bool(word) else "--no-" + name[2:]
            warn_deprecated(f"{name} {word}", new)
            out.append(new)
            index += 1 if inline else 2
            continue
        out.append(token)
        index += 1
    return out


def precision_type(text: str) -> str:
    """--precision values: the registry's names; "no" (accelerate's spelling of fp32) is accepted as fp32."""
    from pipelines.kit.precision import PRECISION_ALIASES

    return PRECISION_ALIASES.get(text, text)


def add_precision_argument(parser: argparse.ArgumentParser, help_text: str, **kwargs) -> None:
    from pipelines.kit.precision import DEFAULT_PRECISION, PRECISIONS

    kwargs.setdefault("default", argparse.SUPPRESS)
    parser.add_argument("--precision", type=precision_type, choices=list(PRECISIONS),
                        help=f"{help_text} (default: {DEFAULT_PRECISION})", **kwargs)


def add_cpu_argument(parser: argparse.ArgumentParser, dest: str = "cpu") -> None:
    """`--cpu`: the device switch of every script (accelerate picks the GPU otherwise; CUDA_VISIBLE_DEVICES picks
    which). The old `--device NAME` stays as a hidden alias."""
    parser.add_argument("--cpu", dest=dest, action=BoolFlag,
                        help="run on the CPU even where a GPU is visible (default: the GPU accelerate picks)")


# ---------------------------------------------------------------------------------------------------------------
# Help text from the config dataclasses: the trailing `# comment` of each field (or the comment lines above it)
# ---------------------------------------------------------------------------------------------------------------


def field_docs(config_class: type) -> dict[str, str]:
    """Field name → its documentation in the dataclass source: the comment after the field on its line, else the
    comment block right above it. Base classes first, so a subclass's comment wins."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    docs: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        if klass is object or not hasattr(klass, "__dataclass_fields__"):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        comments: dict[int, str] = {}  # line number (1-based) → comment text
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string.lstrip("#").strip()
        body = ast.parse(source).body[0].body
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            text = comments.get(node.end_lineno) if node.end_lineno in comments and \
                lines[node.end_lineno - 1].strip()[:1] != "#" else None
            if not text:
                above, number = [], node.lineno - 1
                while number in comments and lines[number - 1].strip().startswith("#"):
                    above.insert(0, comments[number])
                    number -= 1
                text = " ".join(above)
            if text:
                docs[node.target.id] = text
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: Sequence[str] = (),
                         choices: dict[str, Sequence[str]] | None = None, defaults: object = None,
                         batch_flag: str = PER_PROCESS_BATCH_FLAG) -> None:
    """One `--field-name` flag per field of a frozen config dataclass, typed from its annotation, its help the
    field's comment in the source plus its default.

    A field that is itself a config dataclass (a section of a nested config: `model`, `optim`, `run`, ...) is
    recursed into, so its fields get flags of their own names (`--lr`, not `--optim-lr`); the help shows the
    defaults of the enclosing config (its `default_factory`). Defaults stay in the dataclasses (one source of
    truth); flags left out are not passed, so `config_from_arguments` only overrides what the user typed.
    The vocabulary applies here: `output_dir` → `--output-dir`, `batch_size` → `batch_flag`,
    `precision` → the registry's choices, booleans → `--flag/--no-flag`.
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    docs = field_docs(config_class)
    choices = choices or {}
    for item in dataclasses.fields(config_class):
        if item.name in skip:
            continue
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            section_defaults = getattr(defaults, item.name) if defaults is not None else (
                item.default_factory() if item.default_factory is not dataclasses.MISSING else None)
            add_config_arguments(parser, hint, skip, choices, section_defaults, batch_flag)
            continue
        if defaults is not None:
            default = getattr(defaults, item.name)
        else:
            default = item.default if item.default is not dataclasses.MISSING else None
        required = defaults is None and item.default is dataclasses.MISSING and \
            item.default_factory is dataclasses.MISSING
        doc = docs.get(item.name, "")
        if item.name == "batch_size":
            doc = GLOBAL_BATCH_HELP if batch_flag == GLOBAL_BATCH_FLAG else PER_PROCESS_BATCH_HELP
        help_text = f"{doc} ({'required' if required else f'default: {default}'})".strip()
        if item.name == "precision":
            add_precision_argument(parser, doc or "autocast precision")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        base = args[0] if optional and args else hint
        origin = typing.get_origin(base)
        flag = "--" + item.name.replace("_", "-")
        if item.name == "output_dir":
            flag = OUTPUT_DIR_FLAG
        elif item.name == "batch_size":
            flag = batch_flag
            add_deprecated_alias(parser, "--batch-size", batch_flag, item.name, type=positive_int)
        kwargs: dict = {"dest": item.name, "default": argparse.SUPPRESS}
        if item.name in choices:
            kwargs["choices"] = list(choices[item.name])
        if origin is tuple:
            element = typing.get_args(base)[0]
            kwargs.update(type=element, nargs=len(typing.get_args(base)) if ... not in typing.get_args(base) else "+")
        elif base is bool:
            parser.add_argument(flag, dest=item.name, action=BoolFlag, help=help_text)
            continue
        elif base in (int, float, str):
            kwargs["type"] = _optional(base) if optional else base
        else:
            continue  # dicts get dedicated flags in the script
        parser.add_argument(flag, help=help_text, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# --config FILE (YAML or JSON; flags override it) and the effective config written next to a run's outputs
# ---------------------------------------------------------------------------------------------------------------

CONFIG_FILE_NAME = "config.yaml"


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML or JSON file of settings (field names, flat or in sections, as a run's "
                             f"{CONFIG_FILE_NAME} holds them); flags on the command line override it")


def load_config_file(path: str) -> dict[str, object]:
    """The file's settings as flat `dest → value` (sections flattened, `model_overrides` → override flags)."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = file.read_text()
    if file.suffix.lower() == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(values).__name__}")
    flat: dict[str, object] = {}

    def walk(mapping: dict) -> None:
        for key, value in mapping.items():
            key = str(key).replace("-", "_")
            if key == "model_overrides" and isinstance(value, dict):
                flat.update({"override_" + k: v for k, v in value.items()})
            elif isinstance(value, dict):
                walk(value)
            else:
                flat[key] = value

    walk(values)
    return flat


def _subparser_for(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The subcommand's parser when the script has subcommands (its name is the first positional), else `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for token in argv:
                if token in action.choices:
                    return _subparser_for(action.choices[token], argv)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` with `--config FILE` applied first: the file's settings become the defaults, so
    flags given on the command line win. An unknown setting in the file is an error (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    for index, token in enumerate(argv):
        if token == "--config" and index + 1 < len(argv):
            path = argv[index + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    if path is not None:
        target = _subparser_for(parser, argv)
        try:
            values = load_config_file(path)
        except (OSError, ValueError) as error:
            target.error(one_line(error))
        except Exception as error:  # noqa: BLE001 - a YAML syntax error: one line too
            target.error(f"--config {path}: {one_line(error)}")
        dests = {action.dest for action in target._actions}
        values.pop("command", None)
        unknown = sorted(set(values) - dests)
        if unknown:
            target.error(f"--config {path}: unknown setting(s) {unknown}")
        target.set_defaults(**values)
    argv = _rewrite_old_booleans(_subparser_for(parser, argv), argv)
    namespace = parser.parse_args(argv)
    if hasattr(namespace, "config"):
        del namespace.config
    return namespace


def plain(value: object) -> object:
    """Tuples → lists, recursively (what YAML and JSON hold)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def config_dict(config: object) -> dict[str, object]:
    """A config dataclass as the nested dict `--config` reads back (`to_dict()` where it has one)."""
    import dataclasses

    return plain(config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config))


def write_effective_config(directory: str | None, settings: dict[str, object], command: str | None = None,
                           name: str = CONFIG_FILE_NAME) -> str | None:
    """Write a run's effective settings to `<directory>/config.yaml` (main process only), so
    `--config <directory>/config.yaml` reproduces the run. Returns the path written (None elsewhere)."""
    from pathlib import Path

    if directory is None or int(os.environ.get("RANK", "0")) != 0:
        return None
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# effective settings of `{command}`; rerun with --config {path}\n" if command else ""
    try:
        import yaml

        text = yaml.safe_dump(plain(settings), sort_keys=False, allow_unicode=True)
    except ImportError:  # pragma: no cover - pyyaml is a dependency; JSON is valid YAML
        import json

        text = json.dumps(plain(settings), indent=2) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + text)
    tmp.replace(path)
    return str(path)


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


def training_parser(doc: str, config_class: type, choices: dict[str, Sequence[str]],
                    override_flags: dict[str, tuple[type, str]], override_title: str) -> ArgumentParser:
    """A trainer's parser: one flag per config field (precision choices from the one registry; the batch size is
    global) plus the model override flags collected into `model_overrides`."""
    from pipelines.kit.run import TRACKER_CHOICES

    parser = script_parser(doc)
    add_config_arguments(parser, config_class, choices={"log_with": [c for c in TRACKER_CHOICES if c], **choices},
                         batch_flag=GLOBAL_BATCH_FLAG)
    add_override_arguments(parser, override_flags, override_title)
    return parser


def training_config(config_class: type, namespace: argparse.Namespace, override_flags: dict[str, tuple[type, str]]):
    """The trainer's config from its parsed flags, the model overrides included."""
    return config_from_arguments(config_class, namespace, model_overrides=collect_overrides(namespace, override_flags))
