"""Configuration dataclasses from YAML mappings: unknown keys are an error, never silently ignored."""

from __future__ import annotations

from dataclasses import fields


def dataclass_from_dict(cls, values: dict, error: type[Exception] = ValueError):
    """``cls(**values)``, refusing keys that are not fields of ``cls`` (a typo in a YAML file)."""
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise error(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    return cls(**values)
