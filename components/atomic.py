"""Outputs replaced whole: written aside, then swapped in, so no reader sees half of one.

`publish_file(out, write)` has `write` fill a temporary file beside `out`, then renames it over
`out` (one atomic `os.replace`); a failure while writing leaves `out` as it was.

`publish_dir(out_dir, write)` has `write` fill a sibling `.<name>.new`, then swaps it in with two
renames: `out_dir` -> `.<name>.old`, `.<name>.new` -> `out_dir`. A process killed between the two
renames leaves no `out_dir` but the previous folder whole at `.<name>.old`: `readable_dir` falls
back to it, and the next `publish_dir` puts it back before anything else. A failure while writing
leaves the previous folder untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _staging(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.new")


def _retired(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.old")


def _restore(out_dir: Path) -> None:
    """Undo a swap that stopped between its renames: the previous folder goes back in place."""
    if not out_dir.exists() and _retired(out_dir).is_dir():
        _retired(out_dir).rename(out_dir)


def readable_dir(out_dir: Path) -> Path:
    """`out_dir`, or the previous folder while a swap is (or was killed) between its renames."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and _retired(out_dir).is_dir():
        return _retired(out_dir)
    return out_dir


def publish_dir(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Have `write` fill a fresh folder, then swap it in for `out_dir` (see the module doc)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _restore(out_dir)
    staging, retired = _staging(out_dir), _retired(out_dir)
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while writing
    staging.mkdir()
    try:
        write(staging)
        shutil.rmtree(retired, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(retired)
        staging.rename(out_dir)
    except BaseException:
        _restore(out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def publish_file(out: Path, write: Callable[[Path], None]) -> None:
    """Have `write` fill a temporary file beside `out`, then rename it over `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(Path(name))
        os.replace(name, out)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
