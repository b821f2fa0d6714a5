"""Seeds derived from one run seed, one named stream per use.

`derive_seed(seed, "sample.shard", index)` is the seed of a torch or numpy generator for one use
of randomness; a stream's name says which use, its indices which instance (a shard, a rank and
step, a chunk). The value is a pure function of (seed, stream, indices): the same on every
machine, every process and every number of workers, which is what makes a resumed run or a
re-drawn shard bit-identical.

Each stream is a fixed layout of `np.random.SeedSequence` entropy words around the run seed.
The layouts are the ones the training loop and the pipeline's stages used before this module
held them, kept word for word so that every committed run reproduces; tests/test_training.py
pins values they gave. Because SeedSequence treats missing entropy words as zeros,
"evaluate.baseline" and "evaluate.mc", and "evaluate.nll" at chunk 0, give the seeds of sample
shards 1, 3 and 2 of the same run seed: the untrained baseline starts from shard 1's x_T, and
the bounds draw t and noise from the generator state that starts shard 3's (chunk 0: shard 2's)
x_T. Either pairs the same numbers with a different network or a different computation, so no
estimate is biased; a new stream should still use a head that no layout here can produce.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["STREAMS", "Stream", "derive_seed", "derive_seeds"]


@dataclasses.dataclass(frozen=True)
class Stream:
    """The SeedSequence entropy of a stream: `head`, the run seed, `tag`, then `indices`
    caller-given indices. `bits`: each seed's width (63 where the seed goes to
    `torch.manual_seed`, which takes a signed 64-bit value)."""

    head: tuple[int, ...] = ()
    tag: tuple[int, ...] = ()
    indices: tuple[str, ...] = ()
    bits: int = 64


STREAMS: dict[str, Stream] = {
    # Trainer.update: the t/noise generator and the global RNG (dropout) of one step.
    "train.step": Stream(head=(0,), indices=("rank", "step"), bits=63),
    # The sample stage: the generator of each shard, and of the reverse-process picture.
    "sample.shard": Stream(indices=("index",)),
    "sample.trajectory": Stream(tag=(2**32 - 1,)),
    # The evaluate stage: the untrained network's samples, the full bound on each chunk of
    # test images, and the Monte-Carlo bound's draws.
    "evaluate.baseline": Stream(tag=(1, 0)),
    "evaluate.nll": Stream(tag=(2,), indices=("chunk",)),
    "evaluate.mc": Stream(tag=(3, 0)),
}


def derive_seeds(seed: int, stream: str, *indices: int, count: int) -> list[int]:
    """`count` independent seeds of `stream` for run seed `seed` at `indices` (as many as the
    stream names, each a non-negative int)."""
    layout = STREAMS.get(stream)
    if layout is None:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(STREAMS)}")
    if len(indices) != len(layout.indices):
        names = ", ".join(layout.indices) or "no indices"
        raise ValueError(f"seed stream {stream!r} takes ({names}), got {len(indices)} value(s)")
    words = [*layout.head, seed, *layout.tag, *indices]
    state = np.random.SeedSequence(words).generate_state(count, dtype=np.uint64)
    return [int(word >> np.uint64(64 - layout.bits)) for word in state]


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """The seed of `stream` for run seed `seed` at `indices`; see `derive_seeds`."""
    return derive_seeds(seed, stream, *indices, count=1)[0]
