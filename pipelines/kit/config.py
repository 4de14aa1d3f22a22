"""Nested, typed run configs: a frozen dataclass whose fields are section dataclasses (model, data, optim, ...).

Leaf field names are unique across a config's sections, so a flat `name=value` list (CLI flags, the flat
`config.json` of checkpoints written before configs had sections) maps onto the sections without ambiguity.
`to_dict()` writes the nested form; `from_dict()` reads either form (or a mix: nested sections plus flat
overrides); `from_flat(**values)` / `override(**values)` apply flat names on top of the defaults / a config.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any


# Settings a resumed run may change: its length, cadence, outputs, launch and numerics, not what it learns from.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume", "max_steps", "max_minutes", "log_every", "checkpoint_every", "keep_last", "log_with",
    "collective_timeout_s", "num_workers", "image_every", "sample_every", "sample_steps", "sample_images",
    "decode_steps", "tokenizer", "cpu", "max_nonfinite", "precision", "grad_accum", "channels_last",
    "compile",
    "shards", "data", "perceptual_weights", "init_from", "init_encoder_from",  # paths: the checkpoint has the weights
})


class SectionedConfig:
    """Mixin for a frozen dataclass made only of section dataclasses, each with a `default_factory`."""

    @classmethod
    def section_types(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {item.name: hints[item.name] for item in dataclasses.fields(cls)}

    @classmethod
    def leaf_sections(cls) -> dict[str, str]:
        """Each leaf field's name → the section that holds it."""
        owners: dict[str, str] = {}
        for section, section_type in cls.section_types().items():
            for item in dataclasses.fields(section_type):
                if item.name in owners:  # a programming error, caught by the tests that build every config
                    raise TypeError(f"{cls.__name__}: field {item.name!r} is in sections {owners[item.name]!r} "
                                    f"and {section!r}")
                owners[item.name] = section
        return owners

    def override(self, **values: Any):
        """A copy with flat leaf fields replaced (`lr=…, output_dir=…`); each changed section revalidates."""
        owners = type(self).leaf_sections()
        unknown = sorted(set(values) - set(owners))
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} field(s) {unknown}")
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            grouped.setdefault(owners[name], {})[name] = value
        sections = {name: dataclasses.replace(getattr(self, name), **changes) for name, changes in grouped.items()}
        return dataclasses.replace(self, **sections)

    @classmethod
    def from_flat(cls, **values: Any):
        """The defaults with flat leaf fields replaced: one path for call sites that list settings flat."""
        return cls().override(**values)

    def to_dict(self) -> dict[str, Any]:
        """Nested: `{"model": {...}, "optim": {...}, ...}` (what checkpoints store)."""
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Leaf name → value, the pre-sections layout."""
        return {name: value for section in self.to_dict().values() for name, value in section.items()}

    def check_resume(self, checkpoint_dir: Path) -> None:
        """Refuse, in one line, to resume a checkpoint written with other settings (STYLE: a rerun never mixes old
        and new). Only what changes how long, where and how visibly a run goes may differ (`RESUMABLE_CHANGES`)."""
        import json

        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            return
        try:
            previous = type(self).from_dict(json.loads(path.read_text())).to_flat()
        except (TypeError, ValueError) as error:
            raise ValueError(f"cannot compare this run with {checkpoint_dir} ({error}); start a new --output-dir") \
                from None
        current = self.to_flat()
        changed = [name for name, value in current.items() if name not in RESUMABLE_CHANGES
                   and json.dumps(previous.get(name), default=str) != json.dumps(value, default=str)]
        if changed:
            listed = ", ".join(f"{name}={previous.get(name)!r} (now {current[name]!r})" for name in changed[:4])
            raise ValueError(f"{checkpoint_dir} was written with {listed}{' …' if len(changed) > 4 else ''}: resume "
                             "with the same settings, or train into a new --output-dir")

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """From `to_dict()` output or an old flat dict (checkpoints written before sections), or nested sections
        plus flat overrides; JSON lists become tuples in the sections' `__post_init__`."""
        sections = cls.section_types()
        nested: dict[str, Any] = {}
        flat: dict[str, Any] = {}
        for key, value in values.items():
            # A section name that is also a leaf ("data", "model") holds a dict only in the nested form.
            if key in sections and isinstance(value, dict):
                nested.update(value)
            else:
                flat[key] = value
        return cls.from_flat(**{**nested, **flat})


def require_at_least(config: object, minimum: int, *names: str) -> None:
    """One-line ValueError for the first of `names` whose value is below `minimum` (or nan)."""
    for name in names:
        value = getattr(config, name)
        if not value >= minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
