"""Location of the reference checkpoints written by Hugging Face `transformers`.

They live outside the repository, in `shared/fixtures/` beside the checkout (`<checkout>/../shared`),
or wherever the environment variable SEQMODELS_FIXTURES points. Without them the import tests are
skipped, except under CI (the CI environment variable set), where they run and fail.
"""

import os
from pathlib import Path

import pytest

FIXTURES_DIR = Path(os.environ.get(
    "SEQMODELS_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def skip_without(path: Path) -> pytest.MarkDecorator:
    """Return a mark that skips a module when `path` is missing, unless running under CI."""
    return pytest.mark.skipif(not path.is_dir() and not os.environ.get("CI"),
                              reason=f"reference fixture not found: {path} (set SEQMODELS_FIXTURES)")
