"""The model repository the server serves from: scanning, gating, version policies, hot reload.

Layout (Triton's)::

    <root>/<model>/config.json             optional; without it everything comes from the ONNX file
    <root>/<model>/<version>/model.onnx    version = a positive integer directory name ("1", "12")

Only `model.onnx` is ever loaded, and only as ONNX (protobuf): nothing from a model directory is
unpickled or executed. Names and paths never leave the repository: model names with separators,
"..", NUL or a leading "." are refused, and a model directory, version directory, config.json or
model.onnx that is a symlink resolving outside the root is refused (reported in the index).

Versions: `version_policy` selects which versions are served -- `{"latest": {"num_versions": N}}`
(default N=1), `{"all": {}}` or `{"specific": {"versions": [1, 3]}}`. "latest N" means the N
highest versions *that pass the gates*: a broken newest version is refused and the previous one
keeps serving, which is what a hot reload needs.

Hot reload (poll_once): a new or changed model.onnx (device, inode, size, mtime; then sha256 to
ignore a mere touch) is loaded and gated on a worker thread while the old version keeps serving;
then, in one step on the event loop, the new version is swapped in and the replaced one is retired:
its batcher drains the requests it already accepted (`Batcher.close(grace)`) in the background and
its sessions are closed afterwards. A refused file is remembered (stat + sha256 + config
generation) and not retried until it or config.json changes. Replace files atomically (write
elsewhere, then rename) so that a poll never sees half a file; if it does, that half is refused
and the complete file is picked up on the next poll because it differs.

max_batch_size 0 (the model does not batch): the Batcher needs max_batch_size >= 1 and takes the
first axis of every input as rows, so such a model is served through a Batcher whose
max_batch_size is the model's fixed first dimension d. Every valid request then has exactly d
rows and two requests are never merged (d + d > d): requests run one at a time per session,
unchanged. This needs every input and output to have the same fixed first dimension; a
max_batch_size 0 model with a scalar, a dynamic first axis or differing first dims is refused
with a reason saying so (the Batcher has no unbatched mode).

Everything here runs on one event loop; file system scans, hashing, onnxruntime session creation
and the gates run on worker threads (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import onnx

from .batcher import Batcher, BatchingConfig, BatchObserver
from .drift import DriftMonitor, DriftSink, parse_reference
from .errors import (
    BnserveError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ShuttingDownError,
)
from .model import PLATFORM, LoadedModel, ModelSpec, load_model
from .types import V2_TO_NUMPY, TensorSpec

__all__ = [
    "DEFAULT_GRACE_S",
    "DERIVED_MAX_BATCH_SIZE",
    "BatchingSettings",
    "IndexEntry",
    "ModelConfigFile",
    "Repository",
    "ServedModel",
    "State",
    "VersionPolicy",
    "parse_config",
    "validate_model_name",
]

log = logging.getLogger(__name__)

State = Literal["READY", "UNAVAILABLE", "LOADING", "UNLOADING"]

# Without config.json (or without max_batch_size in it): a model whose inputs and outputs all have
# a dynamic first axis batches up to this many rows; any other model gets max_batch_size 0.
DERIVED_MAX_BATCH_SIZE = 64
# How long a replaced or unloaded version's batcher may drain by default.
DEFAULT_GRACE_S = 10.0
# config.json holds per-version BN statistics, so it can be large, but not unboundedly so.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# How many models load at once (each creates `instances` sessions and runs the gates).
_LOAD_CONCURRENCY = 4
# Canonical positive integers only: "01" next to "1" would name one version twice.
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
_MAX_NAME_LEN = 255

# (st_dev, st_ino, st_size, st_mtime_ns) of a file: cheap to compare on every poll.
_Stamp = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# Names


def validate_model_name(name: str) -> str:
    """Return `name` if it can only name a directory directly under the root; else raise
    InvalidInputError. Refused: empty, too long, path separators, "..", NUL and other control
    characters, ":" (drive letters), and a leading "." (hidden directories, "." itself)."""
    if not isinstance(name, str) or not name:
        raise InvalidInputError("a model name must be a non-empty string")
    if len(name) > _MAX_NAME_LEN:
        raise InvalidInputError(f"model name longer than {_MAX_NAME_LEN} characters")
    bad = [c for c in ("/", "\\", "..", ":") if c in name]
    if bad or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        shown = ", ".join(repr(b) for b in bad) or "a control character"
        raise InvalidInputError(
            f"invalid model name {name!r}: contains {shown}; a name must stay inside the repository"
        )
    if name.startswith(".") or Path(name).is_absolute():
        raise InvalidInputError(f"invalid model name {name!r}: hidden or absolute")
    return name


# --------------------------------------------------------------------------------------------
# config.json


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which versions of a model are served (Triton's version_policy)."""

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1  # for "latest"
    versions: tuple[int, ...] = ()  # for "specific"

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return f"specific {list(self.versions)}"
        return "all"

    def candidates(self, on_disk: Iterable[int]) -> list[int]:
        """Versions to try, highest first (for "latest", until num_versions are ready)."""
        present = sorted(set(on_disk), reverse=True)
        if self.kind == "specific":
            wanted = set(self.versions)
            return [v for v in present if v in wanted]
        return present

    def wanted(self, n_candidates: int) -> int:
        """How many ready versions the policy asks for."""
        return min(self.num_versions, n_candidates) if self.kind == "latest" else n_candidates


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    """The `batching` section of config.json (validated against max_batch_size at load)."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    max_combined_batch_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The `batching` object of config.json (what _parse_batching reads back)."""
        out: dict[str, Any] = {
            "max_queue_delay_us": self.max_queue_delay_us,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "max_queue_size": self.max_queue_size,
        }
        if self.max_combined_batch_size is not None:
            out["max_combined_batch_size"] = self.max_combined_batch_size
        return out


@dataclass(frozen=True, slots=True, eq=False)
class ModelConfigFile:
    """A model's parsed config.json (or the defaults when it has none).

    max_batch_size None: derived from the ONNX file at load. inputs/outputs None: not declared;
    when declared they must match the model file (names, datatypes, shapes) or the version is
    refused. `raw` is the whole JSON object, read-only at the top level (labels, preprocessing,
    per-version metadata for whoever wants them).
    """

    name: str
    present: bool = False
    max_batch_size: int | None = None
    batching: BatchingSettings = BatchingSettings()
    version_policy: VersionPolicy = VersionPolicy()
    instances: int | None = None
    labels: tuple[str, ...] = ()
    inputs: tuple[Mapping[str, Any], ...] | None = None
    outputs: tuple[Mapping[str, Any], ...] | None = None
    raw: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _int(value: object, what: str, minimum: int) -> int:
    # bool is an int subclass and JSON 64.0 is a float: neither is a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ModelLoadError(f"{what} must be >= {minimum}, got {value}")
    return value


def _obj(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ModelLoadError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parse_policy(value: object) -> VersionPolicy:
    if value is None:
        return VersionPolicy()
    d = _obj(value, "version_policy")
    if len(d) != 1 or next(iter(d)) not in ("latest", "all", "specific"):
        raise ModelLoadError(
            'version_policy must be one of {"latest": {"num_versions": N}}, {"all": {}}, '
            f'{{"specific": {{"versions": [..]}}}}; got {json.dumps(d)[:200]}'
        )
    kind, body = next(iter(d.items()))
    body = _obj(body, f"version_policy.{kind}")
    if kind == "latest":
        n = _int(body.get("num_versions", 1), "version_policy.latest.num_versions", 1)
        return VersionPolicy("latest", num_versions=n)
    if kind == "all":
        return VersionPolicy("all")
    versions = body.get("versions")
    if not isinstance(versions, list) or not versions:
        raise ModelLoadError("version_policy.specific.versions must be a non-empty list")
    return VersionPolicy(
        "specific",
        versions=tuple(
            sorted({_int(v, "version_policy.specific.versions[]", 1) for v in versions})
        ),
    )


def _parse_batching(value: object) -> BatchingSettings:
    if value is None:
        return BatchingSettings()
    d = _obj(value, "batching")
    preferred = d.get("preferred_batch_sizes", [])
    if not isinstance(preferred, list):
        raise ModelLoadError("batching.preferred_batch_sizes must be a list of integers")
    return BatchingSettings(
        max_queue_delay_us=_int(d.get("max_queue_delay_us", 0), "batching.max_queue_delay_us", 0),
        preferred_batch_sizes=tuple(
            sorted({_int(b, "batching.preferred_batch_sizes[]", 1) for b in preferred})
        ),
        max_queue_size=_int(d.get("max_queue_size", 1024), "batching.max_queue_size", 1),
        max_combined_batch_size=(
            None
            if d.get("max_combined_batch_size") is None
            else _int(d["max_combined_batch_size"], "batching.max_combined_batch_size", 1)
        ),
    )


def _parse_tensors(value: object, what: str) -> tuple[Mapping[str, Any], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ModelLoadError(f"{what} must be a list")
    out = []
    for i, item in enumerate(value):
        t = _obj(item, f"{what}[{i}]")
        if not isinstance(t.get("name"), str):
            raise ModelLoadError(f"{what}[{i}].name must be a string")
        if "datatype" in t and t["datatype"] not in V2_TO_NUMPY:
            raise ModelLoadError(f"{what}[{i}].datatype {t['datatype']!r} is not a datatype")
        if "shape" in t:
            shape = t["shape"]
            if not isinstance(shape, list):
                raise ModelLoadError(f"{what}[{i}].shape must be a list of integers")
            for d in shape:
                _int(d, f"{what}[{i}].shape[]", -1)
        out.append(MappingProxyType(dict(t)))
    return tuple(out)


def parse_config(name: str, data: object) -> ModelConfigFile:
    """Validate a parsed config.json (None: the file is absent). Raises ModelLoadError."""
    if data is None:
        return ModelConfigFile(name=name)
    d = _obj(data, "config.json")
    if d.get("name", name) != name:
        raise ModelLoadError(f"it names the model {d['name']!r} but its directory is {name!r}")
    if d.get("platform", PLATFORM) != PLATFORM:
        raise ModelLoadError(
            f"platform {d['platform']!r} is not served; only {PLATFORM!r} (model.onnx) is"
        )
    mbs = d.get("max_batch_size")
    labels = d.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ModelLoadError("labels must be a list of strings")
    instances = d.get("instances")
    return ModelConfigFile(
        name=name,
        present=True,
        max_batch_size=None if mbs is None else _int(mbs, "max_batch_size", 0),
        batching=_parse_batching(d.get("batching")),
        version_policy=_parse_policy(d.get("version_policy")),
        instances=None if instances is None else _int(instances, "instances", 1),
        labels=tuple(labels),
        inputs=_parse_tensors(d.get("inputs"), "inputs"),
        outputs=_parse_tensors(d.get("outputs"), "outputs"),
        raw=MappingProxyType(dict(d)),
    )


def _check_declared(
    what: str,
    declared: Sequence[Mapping[str, Any]] | None,
    actual: Sequence[TensorSpec],
    max_batch_size: int,
) -> None:
    """A config.json that disagrees with its model file is stale: refuse rather than guess."""
    if declared is None:
        return
    names = {str(t["name"]) for t in declared}
    have = {t.name for t in actual}
    if names != have:
        raise ModelLoadError(
            f"config.json declares {what}s {sorted(names)} but model.onnx has {sorted(have)}"
        )
    by_name = {t.name: t for t in actual}
    for t in declared:
        spec = by_name[str(t["name"])]
        if "datatype" in t and t["datatype"] != spec.datatype:
            raise ModelLoadError(
                f"config.json declares {what} {spec.name!r} as {t['datatype']} but model.onnx "
                f"has {spec.datatype}"
            )
        if "shape" in t:
            want, got = tuple(t["shape"]), spec.shape
            if max_batch_size > 0 and len(want) == len(got) - 1:
                got = got[1:]  # Triton style: dims without the batch axis
            if len(want) != len(got) or any(
                w != -1 and g != -1 and w != g for w, g in zip(want, got, strict=True)
            ):
                raise ModelLoadError(
                    f"config.json declares {what} {spec.name!r} with shape {list(want)} but "
                    f"model.onnx has {list(spec.shape)}"
                )


# --------------------------------------------------------------------------------------------
# Served models and the index


@dataclass(frozen=True, slots=True, eq=False)
class ServedModel:
    """One version being served: its gated sessions and its batcher.

    Submit with `served.batcher.submit(...)` right after `Repository.get()` (no await in
    between): a replaced version's batcher refuses new work (ShuttingDownError) once retired.
    """

    name: str
    version: str
    spec: ModelSpec
    loaded: LoadedModel
    batcher: Batcher
    config: ModelConfigFile
    path: str  # the resolved model.onnx
    sha256: str
    drift: DriftMonitor | None = None  # only with drift_sample_rate > 0 and a drift reference

    @property
    def max_batch_size(self) -> int:
        """As reported to clients (0: the model does not batch)."""
        return self.spec.max_batch_size

    @property
    def preferred_batch_sizes(self) -> tuple[int, ...]:
        return self.batcher.config.preferred_batch_sizes

    @property
    def max_queue_delay_us(self) -> int:
        return self.batcher.config.max_queue_delay_us

    @property
    def max_queue_size(self) -> int:
        return self.batcher.config.max_queue_size

    @property
    def instance_count(self) -> int:
        return self.loaded.pool.size

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One line of the repository index. version "" stands for a model with no usable version
    directory (or a model refused as a whole)."""

    name: str
    version: str
    state: State
    reason: str = ""


# --------------------------------------------------------------------------------------------
# What a scan finds on disk (built on a worker thread)


class _Refused(Exception):
    """A path that may not be used (outside the root, missing, not a regular file)."""


@dataclass(frozen=True, slots=True)
class _DiskVersion:
    path: str | None  # resolved model.onnx, inside the root
    stamp: _Stamp | None
    error: str | None


@dataclass(frozen=True, slots=True)
class _DiskModel:
    exists: bool
    error: str | None = None  # the model directory itself is unusable
    config_stamp: _Stamp | None = None
    # None: config.json unchanged since the last read, not re-read; str: refused with reason.
    config: ModelConfigFile | str | None = None
    versions: Mapping[str, _DiskVersion] = field(default_factory=dict)


def _stamp(path: str) -> _Stamp:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_dims_dynamic(path: str) -> bool:
    """Whether every graph input and output declares a dynamic first axis (for the derived
    max_batch_size). Parses without external data; an unreadable file says False and is then
    refused by load_model with its own, clearer, message."""
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:
        return False
    inits = {i.name for i in proto.graph.initializer}
    values = [v for v in proto.graph.input if v.name not in inits] + list(proto.graph.output)
    if not values:
        return False
    for v in values:
        if not v.type.HasField("tensor_type"):
            return False
        t = v.type.tensor_type
        if not t.HasField("shape") or not t.shape.dim or t.shape.dim[0].HasField("dim_value"):
            return False
    return True


def _unbatched_rows(spec: ModelSpec) -> int:
    """The Batcher max_batch_size that serves a max_batch_size 0 model one request at a time
    (see the module docstring), or ModelLoadError."""
    firsts: set[int] = set()
    for t in (*spec.inputs, *spec.outputs):
        if not t.shape or t.shape[0] < 1:
            raise ModelLoadError(
                f"{t.name!r} has shape {list(t.shape)}: a model that does not batch "
                "(max_batch_size 0) is served one request at a time through the batcher, which "
                "needs a fixed first dimension, the same on every input and output"
            )
        firsts.add(t.shape[0])
    if len(firsts) != 1:
        raise ModelLoadError(
            f"inputs and outputs have different first dimensions {sorted(firsts)}: a model with "
            "max_batch_size 0 needs the same fixed first dimension on all of them to be served"
        )
    return firsts.pop()


# --------------------------------------------------------------------------------------------
# Per-model state (event loop only)


@dataclass(slots=True)
class _Attempt:
    """A refused file: not retried until its stamp/sha or the config changes."""

    stamp: _Stamp | None
    sha256: str | None
    config_gen: int
    reason: str


@dataclass(eq=False, slots=True)
class _Version:
    version: str
    served: ServedModel | None = None
    served_stamp: _Stamp | None = None
    served_gen: int = -1
    attempt: _Attempt | None = None
    loading: bool = False
    draining: int = 0
    reason: str = ""  # why not served; or a note while served (e.g. a newer file was refused)

    @property
    def state(self) -> State:
        if self.served is not None:
            return "READY"
        if self.loading:
            return "LOADING"
        if self.draining:
            return "UNLOADING"
        return "UNAVAILABLE"


@dataclass(eq=False)
class _Model:
    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    scanned: bool = False
    config: ModelConfigFile | None = None  # the configuration in effect
    config_gen: int = 0  # bumped whenever the configuration in effect changes
    config_stamp: _Stamp | None = None
    config_read: bool = False
    config_error: str = ""  # config.json refused (maybe still serving with the previous one)
    dir_error: str = ""  # the model directory itself is unusable
    unloaded: bool = False  # unload() pins it until load()
    versions: dict[str, _Version] = field(default_factory=dict)
    reported: bool | None = None  # the readiness last given to on_change

    @property
    def error(self) -> str:
        """The model-level reason it cannot serve (empty if none)."""
        return self.dir_error or ("unloaded" if self.unloaded else "") or self.config_error

    def ready_versions(self) -> list[_Version]:
        return [v for v in self.versions.values() if v.served is not None]


@dataclass(slots=True)
class _Sync:
    gone: bool = False
    loaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Choice:
    served: ServedModel
    stamp: _Stamp | None
    config_gen: int


# --------------------------------------------------------------------------------------------
# The repository


class Repository:
    """The models under `root` and the versions being served; see the module docstring.

    instances: onnxruntime sessions per served version unless config.json says `instances`.
    observer_factory(name, version): a BatchObserver for each served version's batcher.
    on_change(name, ready): a model's readiness (any version ready) changed; also called once per
    model after its first load attempt, and with False when it is unloaded or deleted.
    on_load_failure(name, version, reason): a version (or, with version "", a whole model's
    config.json) was refused.
    grace: seconds a replaced or unloaded version's batcher gets to drain.
    drift_sample_rate: > 0 gives each version whose config.json has a drift reference a
    DriftMonitor (server/drift.py) fed that fraction of its batches, scores going to drift_sink.
    """

    def __init__(
        self,
        root: Path,
        *,
        instances: int,
        observer_factory: Callable[[str, str], BatchObserver | None] | None = None,
        on_change: Callable[[str, bool], None] | None = None,
        on_load_failure: Callable[[str, str, str], None] | None = None,
        grace: float = DEFAULT_GRACE_S,
        drift_sample_rate: float = 0.0,
        drift_sink: DriftSink | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        if not 0.0 <= drift_sample_rate <= 1.0:
            raise ValueError(f"drift_sample_rate must be in [0, 1], got {drift_sample_rate}")
        self._drift_rate = drift_sample_rate
        self._drift_sink = drift_sink
        self._root = Path(root).resolve()
        self._instances = instances
        self._observer_factory = observer_factory
        self._on_change = on_change
        self._on_load_failure = on_load_failure
        self._grace = grace
        self._models: dict[str, _Model] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._poll_lock = asyncio.Lock()
        self._closed = False

    @property
    def root(self) -> Path:
        return self._root

    # ------------------------------------------------------------------------------ queries

    def names(self) -> list[str]:
        """Every model seen in the repository, ready or not (sorted)."""
        return sorted(self._models)

    def seen(self, name: str, version: str = "") -> bool:
        """Whether model `name` (and, when given, its version directory `version`) was seen in
        the repository, in any state."""
        m = self._models.get(name)
        return m is not None and (not version or version in m.versions)

    def ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except BnserveError:
            return False
        return True

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served version ("" = the highest ready one).

        ModelNotFoundError: unknown model, or no such version directory. ModelNotReadyError:
        known but not serving (refused, loading, unloaded, not selected by version_policy).
        """
        m = self._models.get(name)
        if m is None:
            raise ModelNotFoundError(
                f"unknown model {name!r}; available models: {', '.join(self.names()) or 'none'}"
            )
        if not version:
            ready = m.ready_versions()
            if ready:
                best = max(ready, key=lambda v: int(v.version))
                assert best.served is not None
                return best.served
            raise ModelNotReadyError(f"model {name!r} has no ready version: {self._why(m)}")
        v = m.versions.get(version)
        if v is None:
            listed = ", ".join(f"{k} ({x.state})" for k, x in sorted(m.versions.items(), key=_vkey))
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r}; versions: {listed or 'none'}"
            )
        if v.served is None:
            raise ModelNotReadyError(
                f"model {name!r} version {version} is {v.state}: "
                f"{v.reason or m.error or 'not loaded'}"
            )
        return v.served

    def index(self) -> list[IndexEntry]:
        """Every model and version directory seen, with its state and, if not READY, why."""
        out: list[IndexEntry] = []
        for name in sorted(self._models):
            m = self._models[name]
            if not m.versions:
                if not m.scanned:
                    out.append(IndexEntry(name, "", "LOADING", "loading"))
                else:
                    reason = m.error or "no version directory with a model.onnx"
                    out.append(IndexEntry(name, "", "UNAVAILABLE", reason))
                continue
            for key, v in sorted(m.versions.items(), key=_vkey):
                reason = v.reason if v.served is not None else (v.reason or m.error)
                out.append(IndexEntry(name, key, v.state, reason))
        return out

    def _why(self, m: _Model) -> str:
        if not m.scanned:
            return "loading"
        if m.error:
            return m.error
        parts = [
            f"version {k} {v.state}" + (f" ({v.reason})" if v.reason else "")
            for k, v in sorted(m.versions.items(), key=_vkey)
        ]
        return "; ".join(parts) or m.error or "no version directory with a model.onnx"

    # ------------------------------------------------------------------------------ loading

    async def load_all(self) -> None:
        """Scan the root and load every model's selected versions (refusals are logged and
        reported in the index; they never stop the others)."""
        if not self._root.is_dir():
            raise FileNotFoundError(f"model repository {self._root} is not a directory")
        names = await asyncio.to_thread(self._list_models)
        for name in names:
            self._models.setdefault(name, _Model(name))  # LOADING in the index meanwhile
        await self._sync_many(names)
        ready = [n for n in self.names() if self.ready(n)]
        log.info(
            "repository %s: %d model(s), %d ready%s",
            self._root,
            len(self._models),
            len(ready),
            f" ({', '.join(ready)})" if ready else "",
        )

    async def load(self, name: str) -> None:
        """(Re)load a model from disk now, every selected version afresh (also retrying files
        refused before). Raises InvalidInputError for a name that would leave the repository,
        ModelNotFoundError when its directory is absent, ModelLoadError when nothing could be
        loaded (versions still serving from before keep serving)."""
        validate_model_name(name)
        if self._closed:
            raise ShuttingDownError("the repository is closed")
        res = await self._sync(name, force=True, explicit=True)
        if res.gone:
            raise ModelNotFoundError(
                f"no model directory {name!r} in the repository; available models: "
                f"{', '.join(self.names()) or 'none'}"
            )
        if res.loaded:
            return
        m = self._models.get(name)
        why = "; ".join(
            (f"version {v}: {r}" if v else r) for v, r in sorted(res.refused.items(), key=_vkey)
        )
        raise ModelLoadError(
            f"model {name!r} could not be loaded: {why or (self._why(m) if m else 'gone')}"
        )

    async def unload(self, name: str) -> None:
        """Stop serving a model: get() raises ModelNotReadyError from now on, requests already
        accepted finish (each batcher drains within the grace period, awaited here). The model
        stays unloaded, also across polls, until load(name)."""
        m = self._models.get(name)
        if m is None:
            validate_model_name(name)
            raise ModelNotFoundError(
                f"unknown model {name!r}; available models: {', '.join(self.names()) or 'none'}"
            )
        async with m.lock:
            m.unloaded = True
            tasks = []
            for v in m.versions.values():
                if v.served is not None:
                    tasks.append(self._retire(m, v, v.served, "unloaded by request"))
                    v.served = None
                v.reason = "unloaded"
            self._report(m)
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------ polling

    async def poll_once(self) -> None:
        """One hot-reload pass: new models and versions are loaded, changed files reloaded,
        deleted ones unloaded (see the module docstring)."""
        if self._closed:
            return
        async with self._poll_lock:
            try:
                names = await asyncio.to_thread(self._list_models)
            except OSError as exc:
                # A vanished or unreadable root (an unmounted volume) must not unload everything.
                log.error(
                    "cannot scan model repository %s (%s); keeping what is loaded", self._root, exc
                )
                return
            await self._sync_many(sorted(set(names) | set(self._models)))

    async def poll_forever(self, interval: float) -> None:
        """poll_once every `interval` seconds until cancelled or closed; a failed pass is
        logged and the next one runs anyway."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except Exception:
                log.exception("model repository poll failed")

    # ------------------------------------------------------------------------------ close

    async def close(self, grace: float) -> None:
        """Stop serving everything: every batcher drains within `grace` seconds, then every
        session pool closes. Idempotent."""
        self._closed = True
        tasks = list(self._retiring)
        for m in self._models.values():
            for v in m.versions.values():
                if v.served is not None:
                    tasks.append(self._retire(m, v, v.served, "server shutting down", grace))
                    v.served = None
                    v.reason = "server shutting down"
            self._report(m)
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------ internals

    async def _sync_many(self, names: Sequence[str]) -> None:
        sem = asyncio.Semaphore(_LOAD_CONCURRENCY)

        async def one(name: str) -> None:
            async with sem:
                try:
                    await self._sync(name)
                except Exception:  # a bug for one model must not stop the others
                    log.exception("model %s: repository sync failed", name)

        await asyncio.gather(*(one(n) for n in names))

    async def _sync(self, name: str, *, force: bool = False, explicit: bool = False) -> _Sync:
        # The entry may be removed (model deleted) while we wait for its lock: bounded retry.
        for _ in range(8):
            m = self._models.setdefault(name, _Model(name))
            async with m.lock:
                if self._models.get(name) is not m:
                    continue
                return await self._sync_locked(m, force=force, explicit=explicit)
        raise RuntimeError(f"model {name!r} keeps disappearing during sync")

    async def _sync_locked(self, m: _Model, *, force: bool, explicit: bool) -> _Sync:
        res = _Sync()
        if self._closed:
            return res
        disk = await asyncio.to_thread(
            self._scan_model, m.name, m.config_stamp, force or not m.config_read
        )
        m.scanned = True
        if not disk.exists:
            self._forget(m)
            res.gone = True
            return res
        if m.unloaded and not explicit:
            # Pinned by unload(): keep the index in step with the disk, load nothing.
            self._track_versions(m, disk, "deleted")
            for v in m.versions.values():
                v.reason = "unloaded"
            return res
        m.unloaded = False
        if disk.error is not None:
            if m.dir_error != disk.error:
                self._refuse(m, "", disk.error)
            m.dir_error = disk.error
            self._drop_all(m, disk.error)
            m.versions = {}
            self._report(m)
            res.refused[""] = disk.error
            return res
        m.dir_error = ""
        if disk.config is not None:
            m.config_read = True
            m.config_stamp = disk.config_stamp
            self._apply_config(m, disk.config, res)
        self._track_versions(m, disk, "version directory deleted")
        cfg = m.config
        if cfg is None:  # config.json refused and nothing to keep serving
            for v in m.versions.values():
                v.reason = m.error
            self._report(m)
            return res

        policy = cfg.version_policy
        candidates = [str(v) for v in policy.candidates(int(k) for k in disk.versions)]
        wanted = policy.wanted(len(candidates))
        chosen: dict[str, _Choice] = {}
        tried: set[str] = set()
        try:
            for key in candidates:
                if len(chosen) >= wanted:
                    break
                tried.add(key)
                choice = await self._ensure(m, m.versions[key], disk.versions[key], cfg, force, res)
                if choice is not None:
                    chosen[key] = choice
        except BaseException:
            for c in chosen.values():  # loaded but never swapped in: do not leak sessions
                if c.served is not m.versions[c.served.version].served:
                    await self._discard(c.served)
            raise
        if self._closed:
            for c in chosen.values():
                if c.served is not m.versions[c.served.version].served:
                    await self._discard(c.served)
            return res

        # Swap: one synchronous step, so a request sees either the old set or the new one.
        for key, v in m.versions.items():
            choice = chosen.get(key)
            if choice is None:
                if key not in tried:
                    v.reason = f"not selected by version_policy {policy.describe()}"
                if v.served is not None:
                    self._retire(m, v, v.served, v.reason or "no longer selected")
                    v.served = None
                continue
            old = v.served
            v.served, v.served_stamp = choice.served, choice.stamp
            v.served_gen = choice.config_gen
            if old is not None and old is not choice.served:
                self._retire(m, v, old, "replaced by a new load")
        self._report(m)
        return res

    def _apply_config(self, m: _Model, parsed: ModelConfigFile | str, res: _Sync) -> None:
        if isinstance(parsed, str):
            reason = f"config.json refused: {parsed}"
            self._refuse(m, "", reason)
            res.refused[""] = reason
            if m.config is not None and m.ready_versions():
                # Keep serving what works under the previous configuration.
                m.config_error = f"{reason} (still serving with the previous config.json)"
                for v in m.versions.values():
                    if v.served is not None:
                        v.reason = m.config_error
            else:
                m.config = None
                m.config_error = reason
            return
        if (
            m.config is None
            or dict(m.config.raw) != dict(parsed.raw)
            or (m.config.present != parsed.present)
        ):
            m.config_gen += 1
        m.config = parsed
        m.config_error = ""
        for v in m.versions.values():
            if v.served is not None and v.reason.startswith("config.json refused"):
                v.reason = ""

    def _track_versions(self, m: _Model, disk: _DiskModel, why: str) -> None:
        """Add entries for new version directories; retire and drop deleted ones."""
        for key in list(m.versions):
            if key not in disk.versions:
                v = m.versions.pop(key)
                if v.served is not None:
                    self._retire(m, v, v.served, why)
                    v.served = None
        for key in disk.versions:
            m.versions.setdefault(key, _Version(key))

    async def _ensure(
        self,
        m: _Model,
        v: _Version,
        dv: _DiskVersion,
        cfg: ModelConfigFile,
        force: bool,
        res: _Sync,
    ) -> _Choice | None:
        """What this version should serve after the sync: the current one, a freshly loaded
        one, or None (refused, with nothing from before to keep)."""
        gen = m.config_gen
        keep = _Choice(v.served, v.served_stamp, v.served_gen) if v.served is not None else None
        if dv.error is not None or dv.path is None:
            reason = dv.error or "no model.onnx"
            if v.reason != reason:
                self._refuse(m, v.version, reason)
            v.reason, v.attempt = reason, None
            res.refused[v.version] = reason
            return None  # the path is no longer trustworthy: stop serving it
        if not force:
            if keep is not None and v.served_stamp == dv.stamp and v.served_gen == gen:
                return keep
            a = v.attempt
            if a is not None and a.stamp == dv.stamp and a.config_gen == gen:
                res.refused[v.version] = a.reason
                return keep
        path = dv.path
        v.loading = v.served is None
        try:
            try:
                sha = await asyncio.to_thread(_sha256, path)
            except OSError as exc:
                return self._refused_version(
                    m, v, dv, None, gen, f"cannot read {path}: {exc}", res, keep
                )
            if not force:
                if (
                    keep is not None
                    and v.served is not None
                    and v.served.sha256 == sha
                    and (v.served_gen == gen)
                ):
                    return _Choice(v.served, dv.stamp, gen)  # touched, not changed
                a = v.attempt
                if a is not None and a.sha256 == sha and a.config_gen == gen:
                    a.stamp = dv.stamp
                    res.refused[v.version] = a.reason
                    return keep
            try:
                loaded, batching, drift = await asyncio.to_thread(
                    self._load_version, m.name, v.version, path, cfg
                )
            except ModelLoadError as exc:
                return self._refused_version(m, v, dv, sha, gen, exc.message, res, keep)
            except Exception as exc:
                # Not a gate's verdict but still this file's problem (an onnxruntime or onnx
                # error we did not foresee): refuse this version, keep the others going.
                log.debug("unexpected error loading %s", path, exc_info=True)
                reason = f"unexpected error while loading: {type(exc).__name__}: {exc}"
                return self._refused_version(m, v, dv, sha, gen, reason, res, keep)
        finally:
            v.loading = False
        observer = self._observer(m.name, v.version)
        served = ServedModel(
            name=m.name,
            version=v.version,
            spec=loaded.spec,
            loaded=loaded,
            batcher=Batcher.from_config(loaded.pool, batching, observer, drift),
            config=cfg,
            path=path,
            sha256=sha,
            drift=drift,
        )
        v.attempt = None
        v.reason = ""
        res.loaded.append(v.version)
        return _Choice(served, dv.stamp, gen)

    def _refused_version(
        self,
        m: _Model,
        v: _Version,
        dv: _DiskVersion,
        sha: str | None,
        gen: int,
        reason: str,
        res: _Sync,
        keep: _Choice | None,
    ) -> _Choice | None:
        self._refuse(m, v.version, reason)
        v.attempt = _Attempt(dv.stamp, sha, gen, reason)
        v.reason = (
            f"serving the previously loaded model.onnx; the new one was refused: {reason}"
            if keep is not None
            else reason
        )
        res.refused[v.version] = reason
        return keep

    def _load_version(
        self, name: str, version: str, path: str, cfg: ModelConfigFile
    ) -> tuple[LoadedModel, BatchingConfig, DriftMonitor | None]:
        """Worker thread: gate and load one model.onnx; returns it with its batching config and
        its drift monitor (None unless drift monitoring is on and config.json has a reference)."""
        mbs = cfg.max_batch_size
        if mbs is None:
            mbs = DERIVED_MAX_BATCH_SIZE if _first_dims_dynamic(path) else 0
        loaded = load_model(
            path,
            name=name,
            version=version,
            max_batch_size=mbs,
            instances=cfg.instances or self._instances,
        )
        try:
            _check_declared("input", cfg.inputs, loaded.spec.inputs, mbs)
            _check_declared("output", cfg.outputs, loaded.spec.outputs, mbs)
            b = cfg.batching
            if mbs > 0:
                try:
                    batching = BatchingConfig(
                        max_batch_size=mbs,
                        max_queue_delay_us=b.max_queue_delay_us,
                        preferred_batch_sizes=b.preferred_batch_sizes,
                        max_queue_size=b.max_queue_size,
                        max_combined_batch_size=b.max_combined_batch_size,
                    )
                except ValueError as exc:
                    raise ModelLoadError(f"config.json batching: {exc}") from exc
            else:
                # Never merged (see the module docstring): delay and preferred sizes are moot.
                rows = _unbatched_rows(loaded.spec)
                batching = BatchingConfig(max_batch_size=rows, max_queue_size=b.max_queue_size)
        except BaseException:
            loaded.close()
            raise
        return loaded, batching, self._drift_monitor(name, version, path, cfg)

    def _drift_monitor(
        self, name: str, version: str, path: str, cfg: ModelConfigFile
    ) -> DriftMonitor | None:
        if self._drift_rate <= 0:
            return None
        layers = parse_reference(cfg.raw, version)
        if not layers:
            return None
        try:
            monitor = DriftMonitor(
                name, version, path, layers, rate=self._drift_rate, sink=self._drift_sink
            )
        except Exception:  # optional: a monitor that cannot be built never blocks serving
            log.exception("model %s version %s: no drift monitor", name, version)
            return None
        log.info(
            "model %s version %s: drift monitor on %d layers, sample rate %g",
            name,
            version,
            len(layers),
            self._drift_rate,
        )
        return monitor

    def _observer(self, name: str, version: str) -> BatchObserver | None:
        if self._observer_factory is None:
            return None
        try:
            return self._observer_factory(name, version)
        except Exception:
            log.exception("observer factory failed for model %s version %s", name, version)
            return None

    def _refuse(self, m: _Model, version: str, reason: str) -> None:
        if version:
            log.warning("model %s version %s refused: %s", m.name, version, reason)
        else:
            log.warning("model %s refused: %s", m.name, reason)
        if self._on_load_failure is not None:
            try:
                self._on_load_failure(m.name, version, reason)
            except Exception:
                log.exception("on_load_failure callback failed")

    def _retire(
        self, m: _Model, v: _Version, served: ServedModel, why: str, grace: float | None = None
    ) -> asyncio.Task[None]:
        """Take a version out of service in the background: its batcher drains the requests it
        accepted, then its sessions close. The caller has already stopped routing to it."""
        log.info("model %s version %s unloaded: %s", m.name, served.version, why)
        v.draining += 1
        task = asyncio.get_running_loop().create_task(
            self._drain(v, served, self._grace if grace is None else grace)
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _drain(self, v: _Version, served: ServedModel, grace: float) -> None:
        try:
            await served.batcher.close(grace)
        finally:
            served.loaded.close()
            if served.drift is not None:
                await asyncio.to_thread(served.drift.close)
            v.draining -= 1

    async def _discard(self, served: ServedModel) -> None:
        await served.batcher.close(0.0)
        served.loaded.close()
        if served.drift is not None:
            await asyncio.to_thread(served.drift.close)

    def _drop_all(self, m: _Model, why: str) -> None:
        for v in m.versions.values():
            if v.served is not None:
                self._retire(m, v, v.served, why)
                v.served = None

    def _forget(self, m: _Model) -> None:
        """The model directory is gone: stop serving it and drop it from the index."""
        self._drop_all(m, "model directory deleted")
        if self._models.get(m.name) is m:
            del self._models[m.name]
        if m.reported:
            log.info("model %s removed from the repository", m.name)
        self._set_ready(m, False, only_if_reported=True)

    def _report(self, m: _Model) -> None:
        self._set_ready(m, bool(m.ready_versions()))

    def _set_ready(self, m: _Model, ready: bool, *, only_if_reported: bool = False) -> None:
        if m.reported == ready or (only_if_reported and m.reported is None):
            return
        m.reported = ready
        if self._on_change is not None:
            try:
                self._on_change(m.name, ready)
            except Exception:
                log.exception("on_change callback failed for model %s", m.name)

    # ------------------------------------------------------------------------------ disk

    def _list_models(self) -> list[str]:
        """Worker thread: directory names under the root that can name a model."""
        names = []
        with os.scandir(self._root) as it:
            for entry in it:
                try:
                    validate_model_name(entry.name)
                except InvalidInputError:
                    continue  # hidden or odd names are not models
                if entry.is_dir():  # follows symlinks; where they lead is checked per model
                    names.append(entry.name)
        return sorted(names)

    def _inside(self, path: Path, what: str) -> str:
        """The resolved path, which must exist inside the root; else _Refused."""
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            raise _Refused(f"{what} not found") from None
        except (OSError, RuntimeError) as exc:  # symlink loops, permissions
            raise _Refused(f"{what} cannot be resolved: {exc}") from None
        if not real.is_relative_to(self._root):
            raise _Refused(f"{what} is a link resolving outside the repository ({real})")
        return str(real)

    def _scan_model(self, name: str, known_config: _Stamp | None, reread: bool) -> _DiskModel:
        """Worker thread: what is on disk for one model. config.json is parsed only when
        `reread` or when its stamp differs from `known_config` (None: it was absent)."""
        validate_model_name(name)
        model_dir = self._root / name
        if not os.path.lexists(model_dir):
            return _DiskModel(exists=False)
        try:
            real_dir = self._inside(model_dir, "model directory")
        except _Refused as exc:
            return _DiskModel(exists=True, error=str(exc))
        if not os.path.isdir(real_dir):
            return _DiskModel(exists=False)

        config_stamp: _Stamp | None = None
        config: ModelConfigFile | str | None = None
        cfg_path = Path(real_dir) / "config.json"
        if os.path.lexists(cfg_path):
            try:
                real_cfg = self._inside(cfg_path, "config.json")
                config_stamp = _stamp(real_cfg)
                if reread or config_stamp != known_config:
                    config = self._read_config(name, real_cfg)
            except _Refused as exc:
                config = str(exc)
            except OSError as exc:
                config = f"cannot read it: {exc}"
        elif reread or known_config is not None:  # absent now: the defaults
            config = parse_config(name, None)

        versions: dict[str, _DiskVersion] = {}
        with os.scandir(real_dir) as it:
            entries = [e for e in it if _VERSION_RE.fullmatch(e.name) and e.is_dir()]
        for entry in entries:
            try:
                real_vdir = self._inside(Path(real_dir) / entry.name, "version directory")
                real_file = self._inside(Path(real_vdir) / "model.onnx", "model.onnx")
                if not os.path.isfile(real_file):
                    raise _Refused("model.onnx is not a regular file")
                versions[entry.name] = _DiskVersion(real_file, _stamp(real_file), None)
            except _Refused as exc:
                versions[entry.name] = _DiskVersion(None, None, str(exc))
            except OSError as exc:
                versions[entry.name] = _DiskVersion(None, None, f"cannot stat model.onnx: {exc}")
        return _DiskModel(exists=True, config_stamp=config_stamp, config=config, versions=versions)

    @staticmethod
    def _read_config(name: str, path: str) -> ModelConfigFile | str:
        """Worker thread: parse and validate config.json; a str is the refusal reason."""
        try:
            if os.path.getsize(path) > MAX_CONFIG_BYTES:
                return f"larger than {MAX_CONFIG_BYTES} bytes"
            with open(path, encoding="utf-8") as f:
                text = f.read()
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"not valid JSON: {exc}"
        except (OSError, UnicodeDecodeError) as exc:
            return f"cannot read it: {exc}"
        try:
            return parse_config(name, data)
        except ModelLoadError as exc:
            return exc.message


def _vkey(item: tuple[str, Any]) -> int:
    return int(item[0]) if item[0].isdigit() else 0
