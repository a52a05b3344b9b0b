"""Command-line arguments -> the image files to classify: files, folders (recursively) and globs."""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path

# What Pillow, and so the service, decodes; folders are searched for these (case-insensitive).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_GLOB_CHARS = frozenset("*?[")


def _images_in(folder: Path) -> Iterator[Path]:
    found = (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    yield from sorted(found)


def expand(arguments: Iterable[str]) -> list[str]:
    """Every argument as paths, in order, each once.

    A file is taken whatever its extension (the service says if it is no image); a folder
    gives its images, recursively, sorted; a pattern (``photos/**/*.jpg``) gives what it
    matches. Anything else, and a folder or a pattern that gives nothing, is kept as given,
    so that it is reported (a failure, not silently nothing).
    """
    paths: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            paths.extend([str(p) for p in _images_in(path)] or [argument])
        elif not path.exists() and _GLOB_CHARS & set(argument):
            matched = [m for m in sorted(glob.glob(argument, recursive=True))]
            found = [p for m in matched for p in (map(str, _images_in(Path(m))) if Path(m).is_dir() else [m])]
            paths.extend(found or [argument])
        else:
            paths.append(argument)
    return list(dict.fromkeys(paths))
