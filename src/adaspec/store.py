"""Snapshots of learned state: atomic, checksummed, versioned files in a state directory.

A snapshot ``NAME.snap`` is one header line of JSON, then the payload::

    {"created_unix": ..., "encoding": "gzip+json", "magic": "adaspec-snapshot",
     "name": "suffix", "payload_bytes": N, "sha256": "...", "summary": {...},
     "version": 1}\\n
    <N bytes: gzip-compressed JSON of the state dict>

``sha256`` covers the canonical JSON of every other header field, a newline,
and the payload, so a flipped bit anywhere past the magic is detected. The
``summary`` (tenants and their stored tokens) lets ``inspect`` report without
decoding the payload's meaning.

Writes are atomic (the usual POSIX recipe): write a temp file in the same
directory, flush and fsync it, ``os.replace`` it onto the real name, fsync the
directory. A process killed mid-write leaves at most a stray temp file (removed
by the next ``SnapshotStore`` once its writer is dead), never a partial file
under the real name, so the previous snapshot stays intact.

Reads never raise for a bad file: a truncated, bit-flipped, undecodable or
foreign-version snapshot is logged, renamed aside (``NAME.snap.corrupt-<UTC
time>`` or ``NAME.snap.foreign-<UTC time>``), and ``load`` returns None so the
service starts fresh. State must be JSON-compatible: dicts with string keys,
lists, strings, finite numbers, booleans, None.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import time
import zlib
from pathlib import Path
from typing import Any, Optional, Union

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = "adaspec-snapshot"
ENCODING = "gzip+json"
SUFFIX = ".snap"
MAX_HEADER_BYTES = 1 << 20  # the header line, including the summary
MAX_STATE_BYTES = 1 << 31  # decompressed JSON; more is treated as corrupt (a gzip bomb)

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.snap\.tmp-(?P<pid>\d+)-")
_ASIDE_RE = re.compile(r"^(?P<name>.+)\.snap\.(?P<kind>corrupt|foreign)-")

PathLike = Union[str, "os.PathLike[str]"]


class SnapshotError(Exception):
    """A snapshot file failed verification.

    Attributes:
        kind: "corrupt" (truncated, bit-flipped, undecodable) or "foreign"
            (another format version).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def encode_snapshot(name: str, state: dict[str, Any], created_unix: Optional[float] = None) -> bytes:
    """Serialize ``state`` as a snapshot file's bytes (header line + gzip JSON payload).

    Args:
        name: the snapshot's name (recorded in the header).
        state: a JSON-compatible dict.
        created_unix: creation time, seconds since the epoch; now if None.

    Returns:
        The complete file contents.

    Raises:
        TypeError / ValueError: if ``state`` is not a dict or not JSON-compatible.
    """
    if not isinstance(state, dict):
        raise TypeError(f"snapshot state must be a dict, got {type(state).__name__}")
    raw = json.dumps(state, separators=(",", ":"), allow_nan=False).encode("utf-8")
    payload = gzip.compress(raw, compresslevel=6, mtime=0)
    meta = {
        "magic": MAGIC,
        "version": FORMAT_VERSION,
        "encoding": ENCODING,
        "name": name,
        "created_unix": time.time() if created_unix is None else float(created_unix),
        "payload_bytes": len(payload),
        "summary": summarize_state(state),
    }
    meta["sha256"] = _digest(meta, payload)
    header = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"
    return header + payload


def decode_snapshot(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and decode a snapshot file's bytes.

    Args:
        data: the whole file.

    Returns:
        ``(header, state)``.

    Raises:
        SnapshotError: kind "foreign" for another format version, "corrupt" for
            anything else that fails (magic, length, checksum, gzip, JSON).
    """
    header = read_header(data)
    payload = data[data.index(b"\n") + 1 :]
    if len(payload) != header.get("payload_bytes"):
        raise SnapshotError(
            "corrupt", f"payload is {len(payload)} bytes, header says {header.get('payload_bytes')} (truncated?)"
        )
    expected = header.get("sha256")
    meta = {k: v for k, v in header.items() if k != "sha256"}
    if not isinstance(expected, str) or _digest(meta, payload) != expected:
        raise SnapshotError("corrupt", "sha256 checksum mismatch")
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        raw = d.decompress(payload, MAX_STATE_BYTES + 1)
        if len(raw) > MAX_STATE_BYTES or not d.eof:
            raise SnapshotError("corrupt", "payload does not decompress to a complete document within the size limit")
        state = json.loads(raw.decode("utf-8"))
    except SnapshotError:
        raise
    except (zlib.error, UnicodeDecodeError, ValueError) as e:
        raise SnapshotError("corrupt", f"payload does not decode: {e}") from e
    if not isinstance(state, dict):
        raise SnapshotError("corrupt", f"payload is a {type(state).__name__}, not a dict")
    return header, state


def read_header(data: bytes) -> dict[str, Any]:
    """Parse and sanity-check the header line (magic and version; not the checksum).

    Raises:
        SnapshotError: as in ``decode_snapshot``.
    """
    nl = data.find(b"\n", 0, MAX_HEADER_BYTES)
    if nl < 0:
        raise SnapshotError("corrupt", "no header line (empty or truncated file)")
    try:
        header = json.loads(data[:nl].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SnapshotError("corrupt", f"header is not JSON: {e}") from e
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise SnapshotError("corrupt", "not an adaspec snapshot (bad magic)")
    if header.get("version") != FORMAT_VERSION:
        raise SnapshotError(
            "foreign", f"snapshot format version {header.get('version')!r}, this build reads {FORMAT_VERSION}"
        )
    if header.get("encoding") != ENCODING:
        raise SnapshotError("corrupt", f"unknown payload encoding {header.get('encoding')!r}")
    return header


def _digest(meta: dict[str, Any], payload: bytes) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("ascii"))
    h.update(b"\n")
    h.update(payload)
    return h.hexdigest()


def summarize_state(state: Any) -> dict[str, Any]:
    """Tenants and stored tokens in a state dict, for the header and ``inspect``.

    Looks (up to 4 levels deep) for ``"tenants": {tenant: {"sequences": [[ids]...]}}``
    namespaces, as the suffix speculator's ``state_dict`` writes, and for a
    ``"shared"`` layer beside them.

    Returns:
        ``{"tenants": {tenant: tokens}, "shared_tokens": int, "tokens": int}``.
    """
    tenants: dict[str, int] = {}
    shared = 0

    def seq_tokens(v: Any) -> int:
        if isinstance(v, dict) and isinstance(v.get("sequences"), list):
            return sum(len(s) for s in v["sequences"] if isinstance(s, list))
        return 0

    def visit(obj: Any, depth: int) -> None:
        nonlocal shared
        if depth > 4 or not isinstance(obj, dict):
            return
        t = obj.get("tenants")
        if isinstance(t, dict):
            for name, v in t.items():
                tenants[str(name)] = tenants.get(str(name), 0) + seq_tokens(v)
            shared += seq_tokens(obj.get("shared"))
        for k, v in obj.items():
            if k not in ("tenants", "shared"):
                visit(v, depth + 1)

    visit(state, 0)
    return {"tenants": tenants, "shared_tokens": shared, "tokens": sum(tenants.values()) + shared}


SNAPSHOT_MODE = 0o600  # snapshot files: owner read/write only


def write_atomic(path: Path, data: bytes, mode: int = SNAPSHOT_MODE) -> None:
    """Replace ``path`` with ``data`` atomically: temp file ``.NAME.tmp-*``, fsync, rename, fsync the folder.

    The file is created with ``mode`` whatever the umask (default 0600: learned
    state comes from users' text; only the server's user may read it).

    Raises:
        OSError: the write failed; the previous file is untouched.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class SnapshotStore:
    """Named snapshots in one directory (``NAME.snap``), written atomically.

    Args:
        state_dir: the directory; created if missing.

    Raises:
        OSError: if the directory cannot be created.
    """

    def __init__(self, state_dir: PathLike) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()

    def path(self, name: str) -> Path:
        """The file of snapshot ``name``.

        Raises:
            ValueError: unless ``name`` is 1-128 characters of ``[A-Za-z0-9_.-]``
                not starting with "." or "-".
        """
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"snapshot name must match {_NAME_RE.pattern}, got {name!r}")
        return self.state_dir / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        """Names of the snapshots present (valid or not), sorted."""
        return sorted(p.name[: -len(SUFFIX)] for p in self.state_dir.glob(f"*{SUFFIX}") if p.is_file())

    def save(self, name: str, state: dict[str, Any]) -> Path:
        """Write snapshot ``name`` atomically (temp file, fsync, rename, fsync directory).

        Args:
            name: snapshot name (see ``path``).
            state: a JSON-compatible dict.

        Returns:
            The snapshot's path.

        Raises:
            ValueError / TypeError: bad name or non-JSON state (nothing written).
            OSError: the write failed; the previous snapshot is untouched.
        """
        path = self.path(name)
        write_atomic(path, encode_snapshot(name, state))
        return path

    def load(self, name: str) -> Optional[dict[str, Any]]:
        """Read snapshot ``name``; None if it is missing or bad (never raises for a bad file).

        A file that fails verification is logged at WARNING and renamed to
        ``NAME.snap.corrupt-<UTC time>`` (or ``.foreign-`` for another format
        version) so the next save does not overwrite the evidence.

        Raises:
            ValueError: only for an invalid ``name``.
        """
        path = self.path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read snapshot %s: %s; starting without it", path, e)
            return None
        try:
            _, state = decode_snapshot(data)
        except SnapshotError as e:
            aside = self._set_aside(path, e.kind)
            log.warning(
                "snapshot %s is %s (%s); moved it to %s and starting without it",
                path,
                "from another format version" if e.kind == "foreign" else "corrupt",
                e,
                aside if aside is not None else "(could not move it)",
            )
            return None
        return state

    def _set_aside(self, path: Path, kind: str) -> Optional[Path]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{time.time_ns() % 1_000_000_000:09d}"
        aside = path.with_name(f"{path.name}.{kind}-{stamp}")
        try:
            os.replace(path, aside)
            _fsync_dir(self.state_dir)
        except OSError as e:
            log.warning("cannot move bad snapshot %s aside: %s", path, e)
            return None
        return aside

    def _remove_stale_temp_files(self) -> None:
        """Delete temp files whose writer process is gone (killed mid-write)."""
        for p in self.state_dir.iterdir():
            m = _TMP_RE.match(p.name)
            if m is None or _pid_alive(int(m.group("pid"))):
                continue
            try:
                p.unlink()
                log.info("removed stale snapshot temp file %s", p)
            except OSError:
                pass


def forget_tenant_in_state(state: Any, tenant: str) -> int:
    """Remove ``tenant`` from a speculator state in place; returns how many entries went.

    Walks the state (composites such as atlas nest their children's states):
    a ``"tenants"`` mapping loses the tenant's key (counted by its sequences),
    and an ``"estimates"`` list loses the entries whose ``"tenant"`` is it.
    """
    removed = 0
    if isinstance(state, dict):
        tenants = state.get("tenants")
        if isinstance(tenants, dict) and tenant in tenants:
            held = tenants.pop(tenant)
            seqs = held.get("sequences") if isinstance(held, dict) else None
            removed += len(seqs) if isinstance(seqs, list) else 1
        estimates = state.get("estimates")
        if isinstance(estimates, list):
            keep = [e for e in estimates if not (isinstance(e, dict) and e.get("tenant") == tenant)]
            removed += len(estimates) - len(keep)
            state["estimates"] = keep
        for key, value in state.items():
            if key not in ("tenants", "estimates"):
                removed += forget_tenant_in_state(value, tenant)
    elif isinstance(state, list):
        for value in state:
            if isinstance(value, (dict, list)):
                removed += forget_tenant_in_state(value, tenant)
    return removed


def delete_tenant(state_dir: PathLike, tenant: str) -> dict[str, int]:
    """Delete ``tenant``'s learned state from every snapshot in ``state_dir`` (``adaspec state delete``).

    Each snapshot holding the tenant is rewritten atomically without it (a
    bad snapshot is set aside, as at load). Run it while no server uses the
    folder (a running server would write its memory back at its next
    snapshot; use its ``DELETE /admin/tenants/{tenant}/state`` instead).

    Returns:
        ``{snapshot name: entries removed}`` for the snapshots that held the tenant.

    Raises:
        FileNotFoundError: no such folder.
    """
    if not Path(state_dir).is_dir():
        raise FileNotFoundError(f"{state_dir}: no such state directory")
    store = SnapshotStore(state_dir)
    out: dict[str, int] = {}
    for name in store.names():
        state = store.load(name)
        if not state:
            continue
        n = forget_tenant_in_state(state, tenant)
        if n:
            store.save(name, state)
            out[name] = n
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def inspect(state_dir: PathLike) -> list[dict[str, Any]]:
    """Describe every snapshot in ``state_dir`` without changing anything.

    Args:
        state_dir: a directory of ``NAME.snap`` files.

    Returns:
        One dict per file, sorted by name: ``name``, ``path``, ``status`` ("ok",
        "corrupt", "foreign" or "set-aside"), ``detail`` (why, when not ok),
        ``version``, ``tenants`` ({tenant: stored tokens}), ``tokens`` (total,
        shared layer included), ``size_bytes``, ``age_s`` (since the snapshot
        was written; file mtime when the header is unreadable). Snapshots
        (``.snap``) come first, then files set aside by ``load``. Empty if the
        directory does not exist.
    """
    d = Path(state_dir)
    if not d.is_dir():
        return []
    now = time.time()
    out: list[dict[str, Any]] = []
    for p in sorted(d.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        aside = _ASIDE_RE.match(p.name)
        if not p.name.endswith(SUFFIX) and aside is None:
            continue
        st = p.stat()
        entry: dict[str, Any] = {
            "name": p.name[: -len(SUFFIX)] if aside is None else aside.group("name"),
            "path": str(p),
            "status": "ok",
            "detail": "",
            "version": None,
            "tenants": {},
            "tokens": 0,
            "size_bytes": st.st_size,
            "age_s": max(0.0, now - st.st_mtime),
        }
        if aside is not None:
            entry["status"] = "set-aside"
            entry["detail"] = f"{aside.group('kind')} file moved aside by load"
            out.append(entry)
            continue
        try:
            data = p.read_bytes()
            header, _ = decode_snapshot(data)
            summary = header.get("summary") or {}
            entry["version"] = header.get("version")
            entry["tenants"] = dict(summary.get("tenants", {}))
            entry["tokens"] = int(summary.get("tokens", 0))
            entry["age_s"] = max(0.0, now - float(header.get("created_unix", st.st_mtime)))
        except SnapshotError as e:
            entry["status"] = e.kind
            entry["detail"] = str(e)
        except OSError as e:
            entry["status"] = "corrupt"
            entry["detail"] = f"unreadable: {e}"
        out.append(entry)
    out.sort(key=lambda e: (e["status"] == "set-aside", e["name"], e["path"]))
    return out


def format_inspect(state_dir: PathLike) -> str:
    """Human-readable report of ``inspect(state_dir)`` for ``adaspec state inspect DIR``.

    Returns:
        A table (name, status, version, tenants, tokens, size, age) followed by
        each snapshot's tenants and token counts; a one-line message when the
        directory is missing or holds no snapshots.
    """
    d = Path(state_dir)
    if not d.is_dir():
        return f"{d}: no such state directory"
    entries = inspect(d)
    if not entries:
        return f"{d}: no snapshots"
    rows = [("NAME", "STATUS", "VERSION", "TENANTS", "TOKENS", "SIZE", "AGE")]
    for e in entries:
        rows.append(
            (
                e["name"],
                e["status"],
                "-" if e["version"] is None else str(e["version"]),
                str(len(e["tenants"])),
                str(e["tokens"]),
                _human_bytes(e["size_bytes"]),
                _human_age(e["age_s"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"state directory {d}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for e in entries:
        if e["detail"]:
            lines.append(f"{e['name']} ({Path(e['path']).name}): {e['detail']}")
        for tenant, tokens in sorted(e["tenants"].items()):
            lines.append(f"{e['name']}: tenant {tenant!r}: {tokens} tokens")
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _human_age(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"
