"""Atomic, pickle-free file I/O shared by the whole package.

Every result file is written to a temporary file in the target directory and
then renamed over the destination, so a crash or Ctrl-C leaves either the old
file or the new one, never a truncated one.  Arrays are stored as ``.npz``
and always loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import tempfile
import zipfile
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["atomic_write", "write_bytes", "write_text", "write_json",
           "read_json", "save_arrays", "load_arrays"]


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary file that replaces ``path`` only on success.

    Args:
      path: destination file; its directory is created if missing.
      mode: ``"wb"`` or ``"w"``.

    Yields:
      The open temporary file.  On success it replaces ``path`` with the
      permissions ``open`` would give: an existing file's mode, else
      ``0o666`` minus the umask.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; give the file the mode open() would.
        os.chmod(tmp, _open_mode(path))
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:  # Linux >= 4.7 reports it; reading it is thread-safe.
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set and restore it: a thread creating a
    # file in between would briefly see the umask 0o22.
    old = os.umask(0o22)
    os.umask(old)
    return old


def _open_mode(path: str) -> int:
    """The permission bits ``open(path, "w")`` would leave ``path`` with.

    An existing file keeps its mode; a new one gets ``0o666 & ~umask``.
    """
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "numpy"):
        return _jsonable(obj.numpy())
    return obj


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically (numpy/TF values converted)."""
    write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True,
                                allow_nan=True) + "\n")


def read_json(path: str) -> Any:
    """Reads a JSON file, with a clear error for a missing or corrupt one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file: {path!r}.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}.") from e


_META_KEY = "__metadata_json__"


def save_arrays(path: str, arrays: Mapping[str, np.ndarray],
                metadata: Mapping[str, Any] | None = None) -> None:
    """Saves named arrays and JSON metadata to one ``.npz`` file, atomically.

    Args:
      path: destination file.
      arrays: name -> numeric array (object arrays are refused).
      metadata: JSON-serialisable dict, stored as UTF-8 bytes.

    Raises:
      TypeError: for an object array or a reserved name.
    """
    payload = {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; only numeric "
                            "arrays can be saved.")
        if name == _META_KEY:
            raise TypeError(f"array name {name!r} is reserved.")
        payload[name] = arr
    meta = json.dumps(_jsonable(dict(metadata or {})), sort_keys=True)
    payload[_META_KEY] = np.frombuffer(meta.encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    write_bytes(path, buf.getvalue())


def load_arrays(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Loads a file written by :func:`save_arrays`, never unpickling.

    Returns:
      ``(arrays, metadata)``.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not a valid archive written by
        :func:`save_arrays` (corrupt, truncated or foreign, or its metadata
        is not a JSON object).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file: {path!r}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path!r} is not a readable tfp_bnn_adv array file "
                         f"(corrupt or truncated?): {e}") from e
    if _META_KEY not in arrays:
        raise ValueError(f"{path!r} has no metadata record; it was not written "
                         "by tfp_bnn_adv.")
    try:
        metadata = json.loads(arrays.pop(_META_KEY).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} has corrupt metadata: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"{path!r}: its metadata record {_META_KEY!r} must "
                         f"be a JSON object, got a {type(metadata).__name__}; "
                         "the file was not written by tfp_bnn_adv.")
    return arrays, metadata


def json_digest(obj: Any) -> str:
    """SHA-256 of a JSON-able object, independent of dict key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def config_digest(config: Any) -> str:
    """:func:`json_digest` of a Keras config without its layer names.

    Keras numbers layer names per process (``"dense_3"``), so names are
    left out: the same architecture gives the same digest in a new process.
    """
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "name"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return json_digest(strip(config))


def array_digest(*arrays) -> str:
    """SHA-256 of arrays' shapes, dtypes and bytes (for fingerprints)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()
