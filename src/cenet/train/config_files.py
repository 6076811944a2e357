"""What the training and the detection configs share: :class:`ConfigSchema` (key checks,
bundled YAML configs, ``--set`` overrides, loading and dumping) and :func:`resume_config_of`
(the config of a resumed run).

A config class is a dataclass whose ``__init__`` converts and validates its fields and whose
``to_dict`` gives them as plain data; :class:`cenet.train.config.TrainConfig` and
:class:`cenet.detection.config.DetectConfig` are two.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import yaml


class Config(Protocol):
    """A config dataclass: its fields as plain data."""

    def to_dict(self) -> dict[str, Any]: ...


C = TypeVar("C", bound=Config)

RESOLVED_KEYS = frozenset({"num_classes", "out", "threads"})
"""Keys that a run fills in when they are null: a null override of them on resume means "as
stored"."""


def dump_yaml(cfg: Config) -> str:
    """The config as YAML text, keys in declaration order."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


@dataclass(frozen=True)
class ConfigSchema(Generic[C]):
    """The files and key checks of one config class.

    Attributes:
        config_cls: the config dataclass.
        package: the package whose ``configs/`` folder holds the bundled YAML configs.
        what: the name of the config in messages (``"config"``, ``"detection config"``).
    """

    config_cls: type[C]
    package: str
    what: str

    def keys(self) -> list[str]:
        """Names of all fields of the config class, in declaration order."""
        return [f.name for f in dataclasses.fields(self.config_cls)]  # type: ignore[arg-type]

    def check_keys(self, keys: Iterable[str], *, source: str) -> None:
        """Reject keys that are not fields of the config class.

        Args:
            keys: the keys to check.
            source: where they come from, for the message (e.g. a file name or ``"--set"``).

        Raises:
            ValueError: naming each unknown key with its close matches, and listing the valid
                keys.
        """
        valid = self.keys()
        unknown = [k for k in keys if k not in valid]
        if not unknown:
            return
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            parts.append(f"{key!r}{hint}")
        raise ValueError(
            f"unknown {self.what} key{'s' if len(unknown) > 1 else ''} in {source}: "
            f"{', '.join(parts)}; valid keys: {', '.join(valid)}"
        )

    def from_dict(self, values: Mapping[str, Any], *, source: str = "config") -> C:
        """A validated config from a mapping of (some of) its fields.

        Raises:
            ValueError: for an unknown key, a value of the wrong type or an invalid value.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"{source} must be a mapping of keys to values, got {type(values)}")
        self.check_keys(values, source=source)
        return self.config_cls(**dict(values))

    def bundled(self) -> list[str]:
        """Names of the configs shipped in the package's ``configs/`` (without ``.yaml``)."""
        folder = resources.files(self.package) / "configs"
        return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))

    def resolve(self, name_or_path: str | os.PathLike[str]) -> Path:
        """The YAML file meant by ``name_or_path``: an existing file, or a bundled config name
        (with or without ``.yaml``).

        Raises:
            FileNotFoundError: when it is neither, listing the bundled names.
        """
        path = Path(name_or_path)
        if path.is_file():
            return path
        name = str(name_or_path)
        if path.name == name:  # a bare name: look among the bundled configs
            stem = name.removesuffix(".yaml")
            bundled = resources.files(self.package) / "configs" / f"{stem}.yaml"
            if bundled.is_file():
                return Path(str(bundled))
        raise FileNotFoundError(
            f"{self.what} {name!r} is neither a file nor a bundled config; bundled configs: "
            f"{', '.join(self.bundled())}"
        )

    def read_yaml(self, name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
        """The key/value mapping of a config file or bundled name (keys checked, not values).

        Raises:
            FileNotFoundError: see :meth:`resolve`.
            ValueError: when the file is not a YAML mapping or has an unknown key.
        """
        path = self.resolve(name_or_path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config keys, got {type(values)}")
        self.check_keys(values, source=str(path))
        return values

    def parse_overrides(self, items: Iterable[str]) -> dict[str, Any]:
        """Parse ``key=value`` strings (``--set``); values are read as YAML (``lr=0.1``,
        ``milestones=[60,120]``, ``data=null``, ``model_kwargs={width: 0.5}``).

        Raises:
            ValueError: for an item without ``=``, an unknown key or a value that is not YAML.
        """
        out: dict[str, Any] = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"override {item!r} is not of the form key=value")
            try:
                out[key] = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError as err:
                raise ValueError(f"value of override {item!r} is not valid YAML: {err}") from None
        self.check_keys(out, source="--set")
        return out

    def load(
        self,
        name_or_path: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> C:
        """Defaults, then the YAML config (file path or bundled name), then ``overrides``.

        Raises:
            FileNotFoundError: for a config that is neither a file nor a bundled name.
            ValueError: for unknown keys or invalid values.
        """
        values: dict[str, Any] = {}
        source = "overrides"
        if name_or_path is not None:
            values.update(self.read_yaml(name_or_path))
            source = f"{name_or_path} + overrides"
        values.update(overrides or {})
        return self.from_dict(values, source=source)

    def dump(self, cfg: C) -> str:
        """The config as YAML text, keys in declaration order (:func:`dump_yaml`)."""
        return dump_yaml(cfg)


def resume_config_of(
    schema: ConfigSchema[C],
    stored: Mapping[str, Any],
    overrides: Mapping[str, Any],
    run_dir: str | os.PathLike[str],
    *,
    mutable: Collection[str],
    resolved: Collection[str] = RESOLVED_KEYS,
) -> C:
    """The config of a resumed run: the checkpoint's, with the ``overrides`` the user gave, and
    ``out`` set to ``run_dir`` (the folder of the checkpoint: a run continues where it is).

    Args:
        schema: the config's schema.
        stored: the config dict saved in the checkpoint.
        overrides: values given again on resume (from ``--config``, ``--set``, flags).
        run_dir: the directory of the resumed checkpoint.
        mutable: the keys that may differ from the checkpoint's.
        resolved: keys a run fills in when null: a null override of them means "as stored".

    Raises:
        ValueError: if an override changes a key outside ``mutable`` (start a new run to change
            it), names another ``out`` than ``run_dir``, or is invalid.
    """
    run_dir = Path(run_dir)
    overrides = {k: v for k, v in overrides.items() if not (k in resolved and v is None)}
    out = overrides.pop("out", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise ValueError(
            f"cannot resume into out={out!r}: the checkpoint is in {str(run_dir)!r} and a "
            f"resumed run continues in the directory of its checkpoint"
        )
    stored = {**stored, "out": str(run_dir)}
    stored_cfg = schema.from_dict(stored, source="checkpoint config")
    wanted = schema.from_dict({**stored, **overrides}, source="resume overrides")
    changed = [
        k for k in overrides if k not in mutable and getattr(wanted, k) != getattr(stored_cfg, k)
    ]
    if changed:
        diffs = "; ".join(
            f"{k}: checkpoint {getattr(stored_cfg, k)!r}, given {getattr(wanted, k)!r}"
            for k in changed
        )
        raise ValueError(
            f"cannot change {', '.join(changed)} when resuming ({diffs}); a resumed run keeps "
            f"the config of its checkpoint (only {', '.join(sorted(mutable))} may "
            f"change). Start a new run (another --out) to train with other settings."
        )
    return wanted
