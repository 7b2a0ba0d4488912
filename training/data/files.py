"""Writing dataset files so that a killed process leaves each file whole or absent, and carrying files over from a
source folder without copying their bytes when a hard link will do.

A file is written to `<final name>.tmp-<tag>` (tag: the process id, or rank and process id), made durable with
fsync and renamed into place (atomic on POSIX); `TEMPORARY_NAME` matches what a killed writer leaves behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TEMPORARY_NAME = re.compile(r"\.tmp-[0-9-]+$")  # `<final name>.tmp-<pid>` or `.tmp-<rank>-<pid>`


def temporary_path(path: Path, tag: str | int | None = None) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(f"{path.name}.tmp-{os.getpid() if tag is None else tag}")


def fsync_and_replace(temporary: Path, final: Path) -> None:
    """Makes `temporary` durable, then renames it to `final` (atomic on POSIX) and syncs the directory, so a
    crash leaves either the whole new file or none."""
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, final)
    try:
        directory = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_bytes_atomically(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    temporary.write_bytes(payload)
    fsync_and_replace(temporary, path)


def write_parquet_atomically(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    pq.write_table(table, temporary)
    fsync_and_replace(temporary, path)


def remove_temporary_files(root: Path, *, skip_dirs: tuple[str, ...] = ()) -> None:
    """Deletes what killed writers left under `root` (files matching `TEMPORARY_NAME`), outside `skip_dirs`."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in skip_dirs]
        for name in files:
            if TEMPORARY_NAME.search(name):
                os.unlink(os.path.join(directory, name))


def link_or_copy(source: Path, destination: Path, *, copy: bool) -> str:
    """Hard-links `source` (resolved: Hub snapshots hold symlinks) to `destination`, or copies it when linking is
    impossible (another file system) or `copy` is set. Replaces an existing destination atomically. Returns
    "hardlink" or "copy"."""
    real = Path(os.path.realpath(source))
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(destination)
    temporary.unlink(missing_ok=True)
    how = "copy"
    if not copy:
        try:
            os.link(real, temporary)
            how = "hardlink"
        except OSError:
            pass
    if how == "copy":
        shutil.copy2(real, temporary)
    os.replace(temporary, destination)
    return how


def copy_tree_except(source_root: Path, output: Path, skip: set[str], *, copy_videos: bool) -> dict[str, int]:
    """Links (videos, unless `copy_videos`) or copies every file of the source except the relative paths and
    folders in `skip`. Returns {"hardlink": n, "copy": m}."""
    counts = {"hardlink": 0, "copy": 0}
    for directory, subdirectories, files in os.walk(source_root, followlinks=True):
        relative_dir = Path(directory).relative_to(source_root)
        subdirectories[:] = [d for d in subdirectories if str(relative_dir / d) not in skip]
        for name in files:
            relative = relative_dir / name
            if str(relative) in skip:
                continue
            is_video = relative.parts[:1] == ("videos",)
            how = link_or_copy(Path(directory) / name, output / relative, copy=copy_videos or not is_video)
            counts[how] += 1
    return counts
