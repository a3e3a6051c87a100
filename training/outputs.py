"""Checks of the output paths that command-line tools write, run before any long computation.

Each function creates the missing folders and checks that a file can be written there. It
raises ValueError with one message that names the flag. A bad path then fails in a second, not
after minutes of measurement or training.
"""

import tempfile
from collections.abc import Sequence
from pathlib import Path


def _check_writable_folder(folder: Path, flag: str, path: str) -> None:
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        where = "is a file" if existing == Path(path) else f"is under the file {existing}"
        raise ValueError(f"--{flag}={path} {where}; pass a path in a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"--{flag}={path}: the folder {folder} is not writable: "
                         f"{error.strerror or error}") from None


def prepare_output_dir(path: str, flag: str) -> Path:
    """Return the folder `path` of the flag `--flag`, created and checked to be writable."""
    if not path:
        raise ValueError(f"--{flag} is empty; pass the folder for the results")
    folder = Path(path)
    _check_writable_folder(folder, flag, path)
    return folder


def prepare_image_path(path: str, flag: str, companions: Sequence[str] = ()) -> Path:
    """Return the image path `path` of the flag `--flag`, with its folder created and checked.

    The extension must be one matplotlib writes. `companions` are suffixes of files written
    beside the image (".md" for a table); neither they nor the image may be existing folders.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (slow import)

    if not path:
        raise ValueError(f"--{flag} is empty; pass the path of an image, such as curves.png")
    image = Path(path)
    extensions = sorted(FigureCanvasAgg.get_supported_filetypes())
    if image.suffix.lower().lstrip(".") not in extensions:
        raise ValueError(f"--{flag}={path} must end in an image extension; allowed: "
                         f"{', '.join('.' + extension for extension in extensions)}")
    for written in (image, *(image.with_suffix(suffix) for suffix in companions)):
        if written.is_dir():
            named = "" if written == image else f": {written}"
            raise ValueError(f"--{flag}={path}{named} is a folder; pass the path of an image "
                             "file")
    _check_writable_folder(image.parent, flag, path)
    return image
