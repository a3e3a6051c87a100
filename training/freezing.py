"""Frozen parameters: an optimizer wrapper that leaves the parameters matching a pattern unchanged.

Parameters are named by their path in the parameter dict joined with "/", for example
`embedding/embedding`, `head/kernel` or `blocks/0/attention/query_proj/kernel`. A frozen parameter
keeps its initial value for the whole run: it gets no gradient step and no weight decay.
"""

import re
from typing import Any

import jax
import optax

TRAINED, FROZEN = "trained", "frozen"


def parameter_path(path: tuple) -> str:
    """Return a pytree path of the parameter dict as "a/b/c" (index keys become numbers)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        parts.append(str(name))
    return "/".join(parts)


def frozen_labels(params: Any, pattern: str) -> Any:
    """Return a pytree like `params` with FROZEN where `re.search(pattern, path)` matches."""
    regex = re.compile(pattern)

    def label(path, leaf) -> str:
        del leaf
        return FROZEN if regex.search(parameter_path(path)) else TRAINED

    return jax.tree_util.tree_map_with_path(label, params)


def freeze_parameters(tx: optax.GradientTransformation, pattern: str
                      ) -> optax.GradientTransformation:
    """Apply `tx` to the parameters whose path does not match `pattern`; zero the others' updates.

    An empty pattern returns `tx` itself. Raises ValueError for a pattern that is not a valid
    regular expression.
    """
    if not pattern:
        return tx
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid config field optimizer.frozen_parameters={pattern!r}: {error}; "
                         "allowed: a Python regular expression over paths like "
                         "'blocks/0/attention/query_proj/kernel'") from None

    def checked_labels(params):
        labels = frozen_labels(params, pattern)
        frozen = [label == FROZEN for label in jax.tree.leaves(labels)]
        if not any(frozen) or all(frozen):
            # The paths with each block index written as N, so the list stays short.
            paths = sorted({re.sub(r"^blocks/\d+/", "blocks/N/", parameter_path(path))
                            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]})
            matches = "no parameter" if not any(frozen) else "every parameter, so nothing trains"
            raise ValueError(
                f"invalid config field optimizer.frozen_parameters={pattern!r}: it matches "
                f"{matches}; allowed: a regular expression matching some of the paths "
                f"{', '.join(paths)}")
        return labels

    return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, checked_labels)
