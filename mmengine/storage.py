"""The model repository: `<root>/<name>/<version>/…` on local disk.

A version directory holds one model. An optional `model.toml` names its
backend and declares its tensors; without one the backend is found from the
files (`DETECTION_ORDER`). `Repository.resolve` turns (name, version) into a
`ModelSpec`, which carries everything a worker needs to load the model and
everything the cache manager needs to reserve bytes before the load.

Manifest keys (all optional):

    backend = "safetensors"   # handler | export | safetensors | torchscript | onnx
    bytes = 1048576           # the estimate reserved before a load
    device = "cpu"            # the device type the model must run on
    trusted = false           # may pickled data in the artifact be unpickled
    warmup = true             # or a table {input = [concrete shape]}
    max_batch_size = 8        # join queued requests into calls of up to 8
                              # rows along the first dimension (0: never)
    token_sha256 = ["…"]      # hex sha256 digests of the tokens that may call
                              # this model (one string or several, for rotation)
    [[inputs]]                # also [[outputs]]
    name = "x"
    dtype = "float32"         # a numpy dtype name
    shape = [-1, 4]           # -1: any size
    [options]                 # backend options, e.g. module = "MLP",
                              # module_kwargs = {hidden = 8} for safetensors

A remote model: the version directory holds only a manifest that says
where the files are and what they must be (mmengine/fetch.py says which
sources are allowed, mmengine/diskcache.py fetches them before a load):

    source = "https://host/models/resnet/1/"   # or http://, file:///abs/dir/
    compress = "zstd"         # keep the artifact compressed in the disk cache
    [files]                   # every file of the model: its hex sha256
    "model.safetensors" = "ab12…"              # "": not checked
    "model.py" = "cd34…"      # files that run code (.py) must be checked,
                              # and the artifact too when trusted = true

Its spec carries `source` and `files` and is resolved from the manifest
alone, the source never asked: its estimate is `bytes`, else 0 (unknown)
until the disk cache fetches it, asking the source for the files' sizes
first (DiskCache.estimate then says them).

Scanning is lazy: `names()` lists one directory, `versions(name)` another,
and only `resolve` opens a model's files (its manifest, a safetensors
header). Results are cached until `rescan()`; a name never seen before is
looked up on disk at once, so a model dropped into the root is found by the
first request that names it. Misses are not cached, so unknown names cannot
grow the cache.
"""
from __future__ import annotations

import bisect
import collections
import copy
import dataclasses
import itertools
import math
import os
import tomllib
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from mmengine import fetch, protocol, tensorfile
from mmengine.cache import INT64_MAX
from mmengine.config import Config
from mmengine.errors import BadRequest, LoadFailed, MMEngineError, ModelNotFound

MANIFEST = "model.toml"

#: The backend of a directory without a manifest: the first entry whose
#: files are all present wins; other files are ignored.
DETECTION_ORDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("handler", ("handler.py",)),
    ("export", ("model.pt2",)),
    ("safetensors", ("model.safetensors", "model.py")),
    ("torchscript", ("model.pt",)),
    ("torchscript", ("model.jit",)),
    ("onnx", ("model.onnx",)),
)
BACKENDS = frozenset(backend for backend, _ in DETECTION_ORDER)
#: Backends that import Python files shipped with the model.
CODE_BACKENDS = frozenset({"handler", "safetensors"})

#: Files Python may run: a model's code must come with digests for them all.
_CODE_SUFFIXES = (".py", ".pyc", ".so", ".pyd")
_MANIFEST_KEYS = frozenset({"backend", "bytes", "device", "trusted", "warmup", "inputs",
                            "outputs", "options", "token_sha256", "source", "files",
                            "compress", "max_batch_size"})
#: The disk cache keeps a compressed artifact as `<artifact>.zst`: one zstd
#: frame that records its content size (see `open_artifact`).
ZSTD_SUFFIX = ".zst"
#: Backends that read their artifact through `open_artifact`.
ZSTD_BACKENDS = frozenset({"safetensors", "torchscript", "export"})
_DEVICE_TYPES = frozenset({"cpu", "cuda"})
# Dtypes a request can carry as a numpy array.
DTYPES = frozenset(protocol.DTYPES)  # what a manifest declares: what the wire carries


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                 # a numpy dtype name, one of DTYPES
    shape: tuple[int, ...]     # -1 marks a dimension of any size


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int
    path: Path                 # the version directory
    backend: str
    artifact: str              # the file the backend opens, inside `path`
    estimated_bytes: int       # 0: a remote model's, unknown until fetched
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    device: str | None = None  # a device type the model requires
    trusted: bool = False
    # Concrete input shapes of the warm-up call run after a load; empty: none.
    warmup: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # The most rows a worker joins queued requests into, along their
    # tensors' first dimension, for one call; 0 or 1: each request alone.
    max_batch_size: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    # Digests (32 raw bytes each) of the tokens that may run this model;
    # empty: anyone who reaches the server may.
    token_digests: tuple[bytes, ...] = ()
    # A remote model: the URL of its directory, (file, hex sha256 or "") for
    # every file, sorted, and how the disk cache stores the artifact. `path`
    # then holds only the manifest: load from `DiskCache.ensure(spec)`.
    source: str = ""
    files: tuple[tuple[str, str], ...] = ()
    compress: str = ""                 # "" | "zstd"

    @property
    def warmup_bytes(self) -> int:
        """The bytes of the warm-up call's inputs (shapes past any memory
        count as what they say, not an error)."""
        itemsize = {t.name: np.dtype(t.dtype).itemsize for t in self.inputs}
        return sum(math.prod(shape) * itemsize[name] for name, shape in self.warmup)


def check_name(name: object) -> str:
    """`name` if it can only mean a directory directly under the root."""
    if (
        not isinstance(name, str)
        or not name
        or _utf8_bytes(name) > 255  # a file name's bytes
        or name.startswith(".")        # hidden files, "." and ".."
        or "/" in name
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise ModelNotFound(f"invalid model name {name!r}")
    return name


def _utf8_bytes(name: str) -> int:
    """The length of `name` in UTF-8; a directory's name whose bytes are no
    UTF-8 (Python's surrogate escapes) counts as too long: no client could
    name it on the wire, and a listing that held it could not be sent."""
    try:
        return len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return 1 << 30


def is_version(text: str) -> bool:
    """Whether `text` spells a version: the canonical decimal of an int
    from 1 to 2^63 - 1. Versions travel as strings in URLs, where "01"
    would alias "1"; and as int64s on the wire (msgpack carries no more)."""
    return (text.isascii() and text.isdigit() and len(text) <= 19  # int() refuses 4,300+ digits
            and str(int(text)) == text and 1 <= int(text) <= MAX_VERSION)


MAX_VERSION = INT64_MAX  # msgpack's signed ints stop there


def parse_version(version: object) -> int:
    """A version as an int (>= 1), from an int or its canonical decimal
    string (a URL's); ModelNotFound for anything else."""
    if isinstance(version, str) and is_version(version):
        return int(version)
    if isinstance(version, int) and not isinstance(version, bool) \
            and 1 <= version <= MAX_VERSION:
        return version
    raise ModelNotFound(f"invalid model version {version!r}")


def page(names: Sequence[str], after: str | None, limit: int | None
         ) -> tuple[Sequence[str], str | None]:
    """The `limit` names (None: all) of the sorted `names` that sort after
    `after` (None: from the first), and the name the next page starts
    after (None: none is left)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    first = 0 if after is None else bisect.bisect_right(names, after)
    last = len(names) if limit is None else min(len(names), first + limit)
    return names[first:last], (names[last - 1] if last < len(names) else None)


@dataclasses.dataclass(frozen=True)
class Scan:
    """What one read of a repository's directories found (Repository.scan)."""
    since: int  # the repository's clock as it read the names
    added: frozenset[str]  # the models added at run time as it began
    names: tuple[str, ...]
    versions: dict[str, tuple[int, ...]]
    read_at: dict[str, int]  # the clock as it read each name's versions
    edited: set[str]  # names whose manifests changed since their specs were read


class Repository:
    """A local model repository. Safe to share between threads: every
    cached value is computed whole and then stored with one assignment."""

    def __init__(self, root: str | os.PathLike[str], config: Config | None = None) -> None:
        self.root = Path(root)
        self.config = config  # which remote sources may be read (default: none)
        self._names: tuple[str, ...] | None = None
        self._versions: dict[str, tuple[int, ...]] = {}
        # Each spec read with its manifest's signature when it was read.
        self._specs: dict[tuple[str, int], tuple[ModelSpec, tuple | None]] = {}
        # Models added at run time (the SageMaker contract's POST /models):
        # a directory holding one model, served as version 1.
        self._added: dict[str, Path] = {}
        # The looks at a name's versions on the disk outside a scan, by the
        # clock before each read, with what it found: of a look and a scan's
        # read of the same name, `take` keeps the one that began later.
        self._clock = itertools.count(1)  # next() is one step: threads share it
        self._looks: dict[str, tuple[int, tuple[int, ...] | None]] = {}

    def add(self, name: str, path: str | os.PathLike[str]) -> None:
        """Serves the model in directory `path` as `name` (version 1).
        BadRequest if the name is taken or the directory holds no model."""
        check_name(name)
        if self.holds(name):
            raise BadRequest(f"model {name!r} already exists")
        path = Path(path)
        if not path.is_dir():
            raise BadRequest(f"{str(path)!r} is not a directory")
        self._added[name] = path
        self._names = None
        try:
            self.resolve(name)  # refuse a directory that holds no servable model
        except BaseException:  # whatever it was, the name is not taken
            self.remove(name)
            raise

    def added(self, name: str) -> bool:
        """Whether `name` was added with `add` (and not removed since)."""
        return name in self._added

    def remove(self, name: str) -> None:
        """Forgets a model added with `add`; ModelNotFound for any other."""
        if self._added.pop(name, None) is None:
            raise ModelNotFound(f"model {name!r} was not added at run time")
        self._looks[name] = (next(self._clock), None)
        self._names = None
        self._versions.pop(name, None)
        self._specs.pop((name, 1), None)

    def rescan(self) -> set[str]:
        """take(scan()): the repository read again and taken at once."""
        return self.take(self.scan())

    def scan(self) -> Scan:
        """Reads the repository's directories again (a thread's work: one
        scandir per model, one stat per manifest read) and changes nothing:
        `take` makes what it found the repository's view. A version's files
        are taken to be immutable (a change is a new version), but its
        manifest may be edited in place: its tokens rotate so, and a spec
        read once is read again once its manifest changes."""
        since, added = next(self._clock), frozenset(self._added)
        self._check_root()
        names = self._scan_names()
        versions, read_at = {}, {}
        for name in names:
            read_at[name] = next(self._clock)
            try:
                versions[name] = self._scan_versions(name)
            except ModelNotFound:  # no version directory (yet, or any more)
                versions[name] = ()
            except (LoadFailed, OSError):  # unreadable: what is known of it stands
                pass
        specs = list(self._specs.items())  # one step: another thread may add to it
        edited = {key[0] for key, (spec, seen) in specs
                  if _signature(spec.path / MANIFEST) != seen}
        self._check_root()  # gone as the models were read: they read as gone too
        return Scan(since, added, names, versions, read_at, edited)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            # A swap that is not atomic, a mount point gone: not "remove every
            # model", which would unload them all and drop their pins.
            raise LoadFailed(f"the repository {str(self.root)!r} is not a directory (any "
                             f"more): serving the models known until it is back")

    def take(self, scan: Scan) -> set[str]:
        """Makes `scan` the repository's view and returns the names whose
        versions changed (a model or a version added or removed) or whose
        manifests were edited. Cheap, no disk access: the engine takes a
        scan on its loop, in the same step as it forgets what it read of
        those names, so no request sees the new versions listed and is
        served the old default. A name that a request looked at on the disk
        after the scan read it is taken as the request found it (a version
        published and asked for by number meanwhile stays listed, and so
        does its pin; one found gone by a failed load stays gone)."""
        looks, self._looks = self._looks, {}  # the older ones: this scan is fresher
        versions = dict(scan.versions)
        for name, (at, found) in list(looks.items()):  # one step: threads
            if at > scan.read_at.get(name, scan.since):
                if found is None:  # an added model removed
                    versions.pop(name, None)
                else:
                    versions[name] = found
        changed = {name for name, known in list(self._versions.items())  # one step: threads
                   if known != versions.get(name)}  # (a name never asked for: no news)
        changed |= set(scan.names) ^ set(self._names or scan.names)
        changed |= scan.edited
        self._versions = versions
        # A model added or removed meanwhile: the names are read at the next look.
        self._names = scan.names if frozenset(self._added) == scan.added else None
        for key in list(self._specs):  # in place: a spec another thread adds meanwhile stays
            if key[0] in changed:
                self._specs.pop(key, None)
        return changed

    def lists(self, name: str) -> bool:
        """Whether the last look found a version of `name`."""
        return bool(self._versions.get(name))

    def listed(self, name: str, version: int) -> bool:
        """Whether this version is there as far as the scans and looks so
        far know (no disk access): a name never scanned is taken to be."""
        if name in self._versions:
            return version in self._versions[name]
        return self._names is None or name in self._names

    def gone(self, name: str) -> bool:
        """Whether the last look found no version of `name` (no disk access:
        a name never looked at is not known to be gone)."""
        if name in self._versions:
            return not self._versions[name]
        return self._names is not None and name not in self._names

    def names(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = self._scan_names()
        return self._names

    def _scan_names(self) -> tuple[str, ...]:
        return tuple(sorted({entry.name for entry in _scandir(self.root)
                             if is_valid_name(entry.name) and _is_dir(entry)}
                            | set(self._added)))

    def versions(self, name: str) -> tuple[int, ...]:
        """The versions of `name`, ascending; ModelNotFound if it has none."""
        check_name(name)
        found = self._versions.get(name)
        if not found:  # never read, or none at the last scan: looked for now
            found = self._look(name)
            if not self._versions.get(name):  # a scan taken meanwhile may know better
                self._versions[name] = found
        return found

    def _look(self, name: str, gone_ok: bool = False) -> tuple[int, ...]:
        """_scan_versions (() for a name with none, if `gone_ok`), outside a
        scan: noted, for the scan read meanwhile to be taken with care."""
        at = next(self._clock)
        try:
            found = self._scan_versions(name)
        except ModelNotFound:
            if not gone_ok:
                raise
            found = ()
        self._looks[name] = (at, found)
        return found

    def look_again(self, name: str, version: int) -> bool:
        """Whether `version` of `name` is there, read from the disk now (a
        load or a read that failed for its files: a rollback may have
        removed it since the last scan). If it is not, the name's versions
        are taken as they are now, and the caller forgets what it read of
        the name; else nothing changes (the next scan tells of the rest)."""
        found = self._look(name, gone_ok=True)
        if version in found:
            return True
        self._versions[name] = found
        for key in [k for k in list(self._specs) if k[0] == name and k[1] not in found]:
            self._specs.pop(key, None)  # list(): one step, as other threads add to it
        return False

    def listing(self, after: str | None = None, limit: int | None = None
                ) -> tuple[list[tuple[tuple[str, int], ModelSpec | MMEngineError]], str | None]:
        """Every version of every model, with its spec or why it cannot be
        read, by name and version (a thread's work: it reads the manifests
        not read yet); with the name to page on from, or None at the end.
        A page is of the `limit` names (all of them: None) that sort after
        `after`, each with all its versions: a page never repeats or skips a
        model that stayed in the repository while the caller walked them."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        names, _ = page(self.names(), after, None)
        out, taken = [], 0
        for name in names:
            if taken == limit:  # a folder with no version takes no place on a page
                return out, out[-1][0][0]
            try:
                versions = self.versions(name)
            except MMEngineError:  # none (any more), or unreadable
                continue
            if not versions:
                continue
            taken += 1
            for version in versions:
                try:
                    out.append(((name, version), self.resolve(name, version)))
                except MMEngineError as e:
                    out.append(((name, version), e))
        return out, None

    def check_version(self, name: str, version: int | str) -> int:
        """`version` of `name` as an int; ModelNotFound if it has none such.
        One asked for by number is looked for, as an unknown name is: it
        need not wait for the next rescan (which makes it the default, and
        lists it)."""
        versions = self.versions(name)
        version = parse_version(version)
        if version in versions:
            return version
        if name not in self._added and version in self._look(name):
            return version
        raise ModelNotFound(f"model {name!r} has no version {version}")

    def holds(self, name: str) -> bool:
        """Whether `name` is a model here: added, or a directory holding a
        version (one whose last version went is no model)."""
        if name in self._added:
            return True
        if name not in self.names():
            return False
        try:
            return bool(self._scan_versions(name))
        except ModelNotFound:
            return False

    def _scan_versions(self, name: str) -> tuple[int, ...]:
        if name in self._added:
            return (1,)
        found = tuple(sorted(int(entry.name) for entry in _scandir(self.root / name)
                             if is_version(entry.name) and _is_dir(entry)))
        if not found:
            raise ModelNotFound(f"model {name!r} not found")
        return found

    def resolve(self, name: str, version: int | str | None = None) -> ModelSpec:
        """The spec of `name` at `version` (default: the highest).

        ModelNotFound for an unknown or invalid name or version; LoadFailed
        for a model that exists but cannot be served as it stands.
        """
        if version is None:
            version = self.versions(name)[-1]
        else:
            version = self.check_version(name, version)
        key = (name, version)
        known = self._specs.get(key)
        if known is not None:
            return known[0]
        path = self._added.get(name) or self.root / name / str(version)
        seen = _signature(path / MANIFEST)  # before: an edit while it is read shows
        try:
            spec = read_spec(name, version, path, self.config)
        except LoadFailed:
            if name in self._added or self.look_again(name, version):
                raise
            raise removed(name, version) from None
        self._specs[key] = (spec, seen)
        return spec


def removed(name: str, version: int) -> ModelNotFound:
    """The error of a version that left the repository as it was read or
    loaded (a rollback the last scan had not seen): no fault of the
    model's, and a request for the default version takes the new one."""
    e = ModelNotFound(f"model {name!r} has no version {version}: it was removed from the "
                      f"repository")
    e.removed = True
    return e


def _signature(path: Path) -> tuple | None:
    """What changes when a file is edited or replaced; None: there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def is_valid_name(name: str) -> bool:
    try:
        check_name(name)
    except ModelNotFound:
        return False
    return True


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:  # unreadable (its permissions): its models fail, not the others
        raise LoadFailed(f"directory {path.name!r} cannot be read ({e.strerror})") from None


# DirEntry.is_dir() and is_file() follow a link and swallow only ENOENT: a
# looping link, one into a folder that may not be searched, a stale NFS
# handle raise. Such an entry is neither, as to os.path.isdir, so that one
# bad link cannot hide every other name of its folder.

def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _version_files(path: Path) -> tuple[set[str], list[str]]:
    """The names of the files in version directory `path`, and each entry
    that cannot be told a file or not, with why."""
    files, unreadable = set(), []
    for entry in _scandir(path):
        try:
            if entry.is_file():
                files.add(entry.name)
            elif entry.name == MANIFEST:
                # A broken link (a ConfigMap's mount gone), a directory: not
                # no manifest, whose model would be served with no tokens.
                unreadable.append(f"{MANIFEST!r} (not a file, or a link to none)")
        except OSError as e:
            unreadable.append(f"{entry.name!r} ({e.strerror})")
    return files, unreadable


# -- one version directory -> ModelSpec -------------------------------------

def read_spec(name: str, version: int, path: Path, config: Config | None = None, manifests: Manifests | None = None,
              estimate: int | None = None, text: bytes | None = None) -> ModelSpec:
    """The spec of the model in version directory `path`; for a remote
    model, `config` says which sources may be read (default: none);
    `manifests` keeps parsed manifests for the next read; `estimate`, its
    size where the caller knows it already (else the files are asked: for
    a worker, a header's read and parse under the GIL on every load);
    `text`, the manifest to read instead of the directory's own (a disk
    cache copy's says its stub as it was fetched: a load is sent the stub's
    serving keys as they are now). Nothing is asked of a remote model's
    source: its estimate is its `bytes`, else 0 until the disk cache
    fetches it (DiskCache.estimate)."""
    where = f"{name} v{version}"
    files, unreadable = _version_files(path)
    if text is not None:
        manifest = _parse_toml(text, where, manifests)
    else:
        manifest = _read_manifest(path / MANIFEST, where, manifests) if MANIFEST in files else {}
    # Why it cannot be served is for those it would serve to hear: the
    # engine checks a caller's token against these first.
    digests = (_parse_digests(manifest["token_sha256"], where)
               if "token_sha256" in manifest else ())
    try:
        if unreadable:  # the manifest or the artifact, maybe: no model to serve as it stands
            raise LoadFailed(f"{where}: cannot be read: {', '.join(sorted(unreadable))}")
        fields = _parse_manifest(manifest, where)
        if digests:
            fields["token_digests"] = digests
        try:
            return _read_spec(name, version, path, files, fields, config, estimate, where)
        except OSError as e:  # its files changed as they were read (a rollback)
            raise LoadFailed(f"{where}: cannot be read ({e.strerror or type(e).__name__})") from None
    except LoadFailed as e:
        e.token_digests = digests
        raise


def _read_spec(name: str, version: int, path: Path, files: set[str], fields: dict[str, Any],
               config: Config | None, estimate: int | None,
               where: str) -> ModelSpec:
    source = fields.get("source", "")
    if source:
        files = {file for file, _ in fields["files"]}
    else:
        files = {file.removesuffix(ZSTD_SUFFIX) for file in files}
    backend, artifact = _find_artifact(fields.pop("backend", None), files, where)
    if source:
        config = config or Config()
        _check_remote(fields, backend, artifact, config, where)
    estimate = fields.pop("bytes", estimate)
    if estimate is None:
        # A remote model's files are sized as they are fetched: a look at
        # the repository (a listing, a request) never waits on its source.
        estimate = 0 if source else _estimate_bytes(path, backend, artifact, where)
    return ModelSpec(name=name, version=version, path=path, backend=backend,
                     artifact=artifact, estimated_bytes=estimate, **fields)


class Manifests:
    """Parsed manifests by their bytes, for a worker, which reads the spec
    of every model it loads: tomllib's parse is most of read_spec's time
    (~0.1 of ~0.2 ms a load). Exact: the file is read each time, and only
    the same bytes find their parse; each caller gets a copy of its own."""

    LIMIT = 256

    def __init__(self) -> None:
        self._parsed: collections.OrderedDict[bytes, dict[str, Any]] = \
            collections.OrderedDict()

    def parse(self, data: bytes) -> dict[str, Any]:
        parsed = self._parsed.get(data)
        if parsed is None:
            parsed = self._parsed[data] = tomllib.loads(data.decode())
            while len(self._parsed) > self.LIMIT:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(data)
        return copy.deepcopy(parsed)


def _check_remote(fields: dict[str, Any], backend: str, artifact: str, config: Config,
                  where: str) -> None:
    if fields.get("compress") and backend not in ZSTD_BACKENDS:
        raise LoadFailed(f"{where}: {MANIFEST}: compress = \"zstd\" needs a backend that "
                         f"reads its artifact as a stream ({', '.join(sorted(ZSTD_BACKENDS))})")
    for file, digest in fields["files"]:
        # The stub vouches for what runs here only through a digest: without
        # one the source could serve anything.
        runs_code = (backend in CODE_BACKENDS and (file.endswith(_CODE_SUFFIXES)
                                                   or "__pycache__" in file.split("/"))
                     or file == artifact and fields.get("trusted"))
        if runs_code and not digest:
            raise LoadFailed(f"{where}: {MANIFEST}: {file!r} runs code on load, so [files] "
                             f"must give its sha256")
    fetch.check_source(fields["source"], config, where)


def open_artifact(path: Path) -> tuple[BinaryIO, int]:
    """A binary stream over the artifact at `path` and its size in bytes.
    Where only `<path>.zst` exists (the disk cache compressed it), the
    stream decompresses on the fly and reads and seeks forward only.
    OSError if neither opens; ValueError for a .zst that is not one sized
    zstd frame."""
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError as missing:
        try:
            raw = open(path.with_name(path.name + ZSTD_SUFFIX), "rb", buffering=0)
        except FileNotFoundError:
            raise missing from None
        return zstd_reader(raw)
    return f, os.fstat(f.fileno()).st_size


def zstd_reader(raw: BinaryIO) -> tuple[BinaryIO, int]:
    import zstandard  # only workers that load a compressed model need it
    try:
        try:
            size = zstandard.frame_content_size(raw.read(18))  # the longest frame header
        except zstandard.ZstdError as e:
            raise ValueError(f"{raw.name} is not a zstd frame: {e}") from None
        if size < 0:
            raise ValueError(f"{raw.name} does not record its decompressed size")
        raw.seek(0)
    except BaseException:
        raw.close()
        raise
    return zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20), size


def _read_manifest(path: Path, where: str, manifests: Manifests | None) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LoadFailed(f"{where}: {MANIFEST} cannot be read: {e}") from e
    return _parse_toml(data, where, manifests)


def _parse_toml(data: bytes, where: str, manifests: Manifests | None) -> dict[str, Any]:
    try:
        return manifests.parse(data) if manifests else tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LoadFailed(f"{where}: {MANIFEST} cannot be read: {e}") from e


def _find_artifact(backend: str | None, files: set[str], where: str) -> tuple[str, str]:
    for candidate, needed in DETECTION_ORDER:
        if backend in (None, candidate) and files.issuperset(needed):
            return candidate, needed[0]
    if backend is None:
        raise LoadFailed(f"{where}: no model file found (expected one of "
                         + ", ".join(" + ".join(n) for _, n in DETECTION_ORDER) + ")")
    needed = " or ".join(" + ".join(n) for b, n in DETECTION_ORDER if b == backend)
    raise LoadFailed(f"{where}: backend {backend!r} needs {needed}")


def _estimate_bytes(path: Path, backend: str, artifact: str, where: str) -> int:
    if backend == "safetensors":
        header, _ = tensorfile.read_header(path / artifact, where)
        return tensorfile.data_bytes(header)
    return tree_bytes(path)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path`, links not followed."""
    total = 0
    for entry in _scandir(path):
        if entry.is_dir(follow_symlinks=False):
            total += tree_bytes(Path(entry.path))
        elif _is_file(entry):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:  # removed since the folder was listed
                pass
    return total


# -- manifest fields ---------------------------------------------------------

def _parse_manifest(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """The ModelSpec fields a manifest sets (its token digests aside:
    read_spec reads those first); LoadFailed names a bad key."""
    for key in manifest:
        if key not in _MANIFEST_KEYS:
            raise LoadFailed(f"{where}: {MANIFEST}: unknown key {key!r}")
    fields: dict[str, Any] = {}
    if "backend" in manifest:
        fields["backend"] = _expect_choice(manifest, "backend", BACKENDS, where)
    if "bytes" in manifest:
        fields["bytes"] = _expect(manifest, "bytes", int, where)
        if fields["bytes"] < 0:
            raise LoadFailed(f"{where}: {MANIFEST}: 'bytes' must not be negative")
    if "device" in manifest:
        fields["device"] = _expect_choice(manifest, "device", _DEVICE_TYPES, where)
    if "trusted" in manifest:
        fields["trusted"] = _expect(manifest, "trusted", bool, where)
    if "options" in manifest:
        fields["options"] = _expect(manifest, "options", dict, where)
    for key in ("inputs", "outputs"):
        if key in manifest:
            fields[key] = _parse_tensors(manifest[key], key, where)
    if "warmup" in manifest:
        fields["warmup"] = _parse_warmup(manifest["warmup"], fields.get("inputs", ()), where)
    if "max_batch_size" in manifest:
        fields["max_batch_size"] = _parse_batch(manifest, fields, where)
    if "source" in manifest:
        fields.update(_parse_remote(manifest, where))
    elif "files" in manifest or "compress" in manifest:
        raise LoadFailed(f"{where}: {MANIFEST}: 'files' and 'compress' describe a remote "
                         f"model and need 'source'")
    return fields


def _parse_remote(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    fields = {"source": _expect(manifest, "source", str, where)}
    try:
        fetch.check_url(fields["source"])
    except ValueError as e:
        raise LoadFailed(f"{where}: {MANIFEST}: 'source': {e}") from None
    if "compress" in manifest:
        fields["compress"] = _expect_choice(manifest, "compress", {"zstd"}, where)
    table = manifest.get("files")
    if not isinstance(table, dict) or not table:
        raise LoadFailed(f"{where}: {MANIFEST}: a 'source' needs a [files] table that "
                         f"names every file of the model")
    files = []
    for file, digest in table.items():
        parts = file.split("/")
        # The names become paths in the disk cache: relative, no hidden or
        # parent components, none that the cache writes itself.
        if (not all(is_valid_name(part) for part in parts) or file == MANIFEST
                or file.endswith(ZSTD_SUFFIX)):
            raise LoadFailed(f"{where}: {MANIFEST}: [files] {file!r} is not a plain "
                             f"relative file name")
        if not (isinstance(digest, str) and (digest == "" or (
                len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)))):
            raise LoadFailed(f"{where}: {MANIFEST}: [files] {file!r} must be a hex sha256 "
                             f"digest, or \"\" (not checked)")
        files.append((file, digest.lower()))
    fields["files"] = tuple(sorted(files))
    return fields


def _parse_digests(value: Any, where: str) -> tuple[bytes, ...]:
    values = [value] if isinstance(value, str) else value
    try:
        if not isinstance(values, list) or not values:
            raise ValueError
        digests = tuple(bytes.fromhex(v) for v in values)
        if any(len(d) != 32 for d in digests):
            raise ValueError
    except (TypeError, ValueError):
        raise LoadFailed(f"{where}: {MANIFEST}: 'token_sha256' must be a hex sha256 digest "
                         f"or a non-empty list of them") from None
    return digests


_KINDS = {int: "an integer", bool: "a boolean", dict: "a table", str: "a string"}


def _expect(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = table[key]
    # TOML booleans are ints to Python; a count of `true` bytes is a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise LoadFailed(f"{where}: {MANIFEST}: {key!r} must be {_KINDS[kind]}, "
                         f"not {value!r}")
    return value


def _expect_choice(table: dict[str, Any], key: str, choices, where: str) -> str:
    value = _expect(table, key, str, where)
    if value not in choices:
        raise LoadFailed(f"{where}: {MANIFEST}: {key!r} must be one of {sorted(choices)}, "
                         f"not {value!r}")
    return value


def _parse_tensors(value: Any, key: str, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list):
        raise LoadFailed(f"{where}: {MANIFEST}: {key!r} must be an array of tables")
    tensors = []
    for i, table in enumerate(value):
        at = f"{key}[{i}]"
        if not isinstance(table, dict) or set(table) != {"name", "dtype", "shape"}:
            raise LoadFailed(f"{where}: {MANIFEST}: {at!r} must have exactly the keys "
                             f"name, dtype and shape")
        name, dtype, shape = table["name"], table["dtype"], table["shape"]
        if not isinstance(name, str) or not name:
            raise LoadFailed(f"{where}: {MANIFEST}: '{at}.name' must be a non-empty string")
        if type(dtype) is not str or dtype not in DTYPES:
            raise LoadFailed(f"{where}: {MANIFEST}: '{at}.dtype' must be one of "
                             f"{sorted(DTYPES)}, not {dtype!r}")
        # A size is an int64, as numpy's and the protocol's are: one past it
        # made every listing of the repository unsendable.
        if not isinstance(shape, list) or not all(
                type(d) is int and -1 <= d <= INT64_MAX for d in shape):
            raise LoadFailed(f"{where}: {MANIFEST}: '{at}.shape' must be a list of "
                             f"sizes (-1: any; at most 2^63 - 1), not {shape!r}")
        tensors.append(TensorSpec(name, str(np.dtype(dtype)), tuple(shape)))
    if len({t.name for t in tensors}) != len(tensors):
        raise LoadFailed(f"{where}: {MANIFEST}: {key!r} repeats a name")
    return tuple(tensors)


def _parse_batch(manifest: dict[str, Any], fields: dict[str, Any], where: str) -> int:
    size = _expect(manifest, "max_batch_size", int, where)
    if size < 0:
        raise LoadFailed(f"{where}: {MANIFEST}: 'max_batch_size' must not be negative")
    if size > 1:
        # Requests are joined, and answers split, along the first dimension:
        # a tensor declared with a fixed one could not take a batch.
        for key in ("inputs", "outputs"):
            for i, t in enumerate(fields.get(key, ())):
                if not t.shape or t.shape[0] != -1:
                    raise LoadFailed(f"{where}: {MANIFEST}: 'max_batch_size' joins requests "
                                     f"along the first dimension: '{key}[{i}].shape' must "
                                     f"begin with -1, not {list(t.shape)}")
    return size


def _parse_warmup(value: Any, inputs: tuple[TensorSpec, ...],
                  where: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if not inputs:
        raise LoadFailed(f"{where}: {MANIFEST}: 'warmup' needs declared inputs")
    if value is False:
        return ()
    if value is True:
        # A free dimension warms up at size 1.
        return tuple((t.name, tuple(1 if d == -1 else d for d in t.shape)) for t in inputs)
    if not isinstance(value, dict) or set(value) != {t.name for t in inputs}:
        raise LoadFailed(f"{where}: {MANIFEST}: 'warmup' must be true, false or a "
                         f"table of a shape per declared input")
    shapes = []
    for t in inputs:
        shape = value[t.name]
        if not (isinstance(shape, list) and len(shape) == len(t.shape) and all(
                type(d) is int and d >= 0 and w in (-1, d) for d, w in zip(shape, t.shape))):
            raise LoadFailed(f"{where}: {MANIFEST}: 'warmup.{t.name}' must be a concrete "
                             f"shape matching {list(t.shape)}, not {shape!r}")
        shapes.append((t.name, tuple(shape)))
    return tuple(shapes)
