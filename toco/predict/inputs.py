"""What predict.py reads: image files, folders (recursive) and text lists of either.

Every input gets a `name`, the relative path its outputs are written under (OUT/masks/<name>.png
and so on): the path inside the folder it was found in, a file's own name, or a list entry's
path relative to the list's folder. Names never leave the output folder (no '..', no absolute
paths); two inputs whose names would collide keep their extensions, and a collision that remains
is an error before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from toco.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class InputImage:
    """One file to predict: where it is and the relative name (posix, no extension) of its
    outputs."""

    path: Path
    name: str


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def folder_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under `folder` (recursive, sorted), skipping hidden files and folders and
    anything under `exclude` (the output folder, when it lies inside an input folder)."""
    found = []
    skip = exclude.resolve() if exclude is not None else None
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and (skip is None or (here / d).resolve() != skip)
        )
        found += [
            here / f for f in sorted(files) if not f.startswith(".") and is_image_name(Path(f))
        ]
    return found


def read_list(list_file: Path) -> list[Path]:
    """The entries of a text list: one path a line, relative to the list's folder; blank lines
    and lines starting with '#' are skipped."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read input list {list_file}: {err}") from None
    entries = [line.strip() for line in lines]
    return [list_file.parent / e for e in entries if e and not e.startswith("#")]


def collect_inputs(
    arguments: Sequence[str], list_files: Sequence[str] = (), exclude: Path | None = None
) -> list[InputImage]:
    """The images named by command-line `arguments` (files, folders, or @list.txt) and by
    `list_files`, in the order given, each file once.

    An argument that does not exist is an error (a typo should stop the run); a list entry
    that does not exist stays an input and is reported as unreadable when it is reached.
    """
    found: list[tuple[Path, PurePosixPath]] = []
    lists = [Path(a[1:]) for a in arguments if a.startswith("@")] + [Path(f) for f in list_files]
    for arg in (a for a in arguments if not a.startswith("@")):
        found += _expand(Path(arg), None, exclude, strict=True)
    for list_file in lists:
        if not list_file.is_file():
            raise UserError(f"input list not found: {list_file}")
        for entry in read_list(list_file):
            found += _expand(entry, list_file.parent, exclude, strict=False)
    if not found:
        shown = ", ".join([*arguments, *list_files]) or "(none given)"
        raise UserError(
            f"no images found in {shown} (image extensions: {' '.join(IMAGE_EXTENSIONS)})"
        )
    return _named(_unique(found))


def _expand(
    path: Path, base: Path | None, exclude: Path | None, strict: bool
) -> list[tuple[Path, PurePosixPath]]:
    """(file, relative name with extension) for a file or every image in a folder."""
    if path.is_dir():
        return [
            (f, PurePosixPath(f.relative_to(path).as_posix())) for f in folder_images(path, exclude)
        ]
    if strict and not path.exists():
        raise UserError(f"input not found: {path}")
    return [(path, _relative_name(path, base))]


def _relative_name(path: Path, base: Path | None) -> PurePosixPath:
    """The path relative to `base` where it lies inside it, else the file's name."""
    if base is not None:
        try:
            inside = Path(os.path.normpath(path)).relative_to(os.path.normpath(base))
            if ".." not in inside.parts:
                return PurePosixPath(inside.as_posix())
        except ValueError:
            pass
    return PurePosixPath(path.name)


def _unique(found: Iterable[tuple[Path, PurePosixPath]]) -> list[tuple[Path, PurePosixPath]]:
    seen, out = set(), []
    for path, rel in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            out.append((path, rel))
    return out


def _named(found: list[tuple[Path, PurePosixPath]]) -> list[InputImage]:
    """Names without the extension, unless two inputs share one: those keep it."""
    stems: dict[str, int] = {}
    for _, rel in found:
        stems[str(rel.with_suffix(""))] = stems.get(str(rel.with_suffix("")), 0) + 1
    owners: dict[str, Path] = {}
    out = []
    for path, rel in found:
        name = str(rel.with_suffix("")) if stems[str(rel.with_suffix(""))] == 1 else str(rel)
        if name in owners:
            raise UserError(
                f"inputs {owners[name]} and {path} would both be written as "
                f"{name}: predict them in separate runs or from one folder"
            )
        owners[name] = path
        out.append(InputImage(path, name))
    return out
