"""Errors about input the user can fix, and the helpers that keep their messages short.

A file from elsewhere (a checkpoint, a diffusers folder, a prepared split, an image) may be
damaged or crafted. Every reader reports what is wrong with it as one `InputError` whose message
names the file (and the key or tensor) and the problem, on one line; the `ddpm` command prints
that line and nothing else. `CheckpointError` is the one error of every checkpoint and EMA-export
read, whichever command reads it.

Messages never echo a value whole: `short_repr` cuts it to a few dozen characters, and
`check_tree` refuses, before anything walks it, a config whose nesting or size (shared references
counted each time they occur, as a walk would meet them) could not be a real config.
"""

from __future__ import annotations

import contextlib
import os
import reprlib
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# A config tree (a checkpoint's "config", a diffusers config.json) nests a few levels and holds a
# few hundred values; a trained_betas list of 100,000 steps is the largest real one.
MAX_TREE_DEPTH = 16
MAX_TREE_NODES = 200_000
# Longest message line printed for one error.
MAX_MESSAGE = 2000

_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxstring = _REPR.maxother = 48
_REPR.maxlong = 24


class InputError(ValueError):
    """A file or value from outside is unusable; the message names it and says why, one line."""


class CheckpointError(InputError):
    """A checkpoint or EMA export cannot be used (missing, not a torch file, config out of
    bounds, weights that do not fit the network or are not finite)."""


def short_repr(value: Any) -> str:
    """repr(value) cut to a few dozen characters, never walking more than a few levels: safe on
    a list nested a thousand deep or a list of shared references whose full repr is exabytes."""
    return _REPR.repr(value)


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with its whitespace runs (newlines included) folded to single spaces, cut to
    `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def check_tree(
    value: Any, where: str, *, max_depth: int = MAX_TREE_DEPTH, max_nodes: int = MAX_TREE_NODES
) -> None:
    """Refuse (InputError naming `where`) a tree of dicts, lists and tuples deeper than
    `max_depth` or holding more than `max_nodes` values in all. Shared references count each
    time they occur, so a list of 60 nested pairs of one list (2**60 values to any walk) stops
    at `max_nodes` visits, before anything else has walked it."""
    count = 1
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Any = list(node.keys()) + list(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            children = node
        else:
            continue
        if depth >= max_depth:
            raise InputError(f"{where}: nested more than {max_depth} levels deep")
        count += len(children)
        if count > max_nodes:
            raise InputError(
                f"{where}: holds more than {max_nodes:,} values (counting repeats); a config "
                "is far smaller"
            )
        stack.extend((child, depth + 1) for child in children)


def check_int(where: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high]; InputError naming `where`, the bounds and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where} must be an integer in [{low}, {high}], got {short_repr(value)}")
    if not low <= value <= high:
        raise InputError(f"{where} must be in [{low}, {high}], got {short_repr(value)}")
    return value


def describe(err: BaseException) -> str:
    """One line for `err`: its message, with the exception's type where the message alone would
    not say what went wrong (a KeyError's message is just the key)."""
    message = one_line(str(err))
    if isinstance(err, (InputError, FileNotFoundError)):
        return message or type(err).__name__
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _torch_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a file torch.save wrote (a zip archive, or a legacy pickle), judged
    from its first bytes; None when it may be one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not head:
        return "an empty file, not a torch checkpoint"
    if head[:1] == b"\x80" or zipfile.is_zipfile(path):
        return None
    if head == b"PK\x03\x04":
        return "truncated or damaged: a zip archive without its central directory"
    return "not a torch checkpoint file (neither a zip archive nor a pickle)"


@contextlib.contextmanager
def reading_checkpoint(path: str | os.PathLike) -> Iterator[None]:
    """Around the read of a checkpoint or EMA export: any failure becomes a `CheckpointError`
    whose one-line message names `path` (the file is refused before torch parses it when its
    first bytes are no torch file's)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    problem = _torch_file_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        message = describe(err)
        if str(path) in message:
            raise CheckpointError(message) from err
        if isinstance(err, RuntimeError) and "state_dict" in message:
            raise CheckpointError(
                f"{path}: the weights do not fit the network its config describes "
                f"({one_line(str(err), 200)})"
            ) from err
        raise CheckpointError(f"{path}: not a usable ddpm checkpoint ({message})") from err


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Around the read of `path`: a ValueError or OSError whose message names the file passes as
    it is; any other failure becomes an `InputError` "`path`: not a usable `what` (...)"."""
    try:
        yield
    except Exception as err:
        if isinstance(err, (ValueError, OSError)) and str(path) in str(err):
            raise
        raise InputError(f"{path}: not a usable {what} ({describe(err)})") from err
