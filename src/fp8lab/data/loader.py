"""The training loader: deterministic, resumable, rank-sharded batches from a Split.

The order of epoch e depends only on (seed, e), so the loader state is just two integers and
a resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import numpy as np
import torch

from fp8lab.data.dataset import Split
from fp8lab.errors import FP8LabError


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _to_pair(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Converting each half straight from the narrow dtype writes the same bytes as converting the
    # window once and copying the inputs, but leaves both tensors contiguous.
    inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))
    targets = torch.from_numpy(windows[:, 1:].astype(np.int64))
    return inputs, targets


class TokenLoader:
    """Endless (inputs, targets) int64 CPU batches of shape (batch_size, seq_len) from `split`.

    Each epoch is a seeded permutation of the split; rank r takes perm[r::world_size], cut to
    the same length on every rank, so no sequence is served twice per epoch across ranks.
    Batches never straddle epochs: the partial tail of each rank's order is dropped.
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        vocab_size: int | None = None,
    ) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0), ("world_size", world_size, 1)):
            if not _is_int(value) or value < low:
                raise FP8LabError(f"{name} must be an integer >= {low}, got {value!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise FP8LabError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        if vocab_size is not None and (not _is_int(vocab_size) or vocab_size < 1):
            raise FP8LabError(f"vocab_size must be a positive integer or None, got {vocab_size!r}")
        self.split = split
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.vocab_size = vocab_size
        self.seq_len = split.seq_len
        self._per_rank = len(split) // self.world_size
        self.batches_per_epoch = self._per_rank // self.batch_size
        if self.batches_per_epoch == 0:
            need = self.batch_size * self.world_size
            raise FP8LabError(
                f"data split {split.name!r} in {split.path} has {len(split)} sequences but one step needs {need} "
                f"(batch_size {self.batch_size} x world_size {self.world_size}); "
                "lower the batch size or prepare more data"
            )
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches already served in the current epoch."""
        return self._position

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.split)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return perm[self.rank :: self.world_size][: self._per_rank]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) pair; rolls over to the next epoch when this one is used up."""
        if self._position == self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
            self._order = self._epoch_order(self._epoch)
        start = self._position * self.batch_size
        windows = self.split.gather(self._order[start : start + self.batch_size])
        if self.vocab_size is not None:
            top = int(windows.max())
            if top >= self.vocab_size:
                raise FP8LabError(
                    f"data {self.split.path} (split {self.split.name!r}) contains token id {top} but the model's "
                    f"vocab_size is {self.vocab_size}; raise model.vocab_size to at least {top + 1} "
                    "or re-tokenize the data"
                )
        self._position += 1
        return _to_pair(windows)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Where the loader is: {"epoch", "position"} with position = batches served this epoch."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the next batches equal an uninterrupted loader's."""
        if not isinstance(state, dict) or set(state) != {"epoch", "position"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise FP8LabError(f"loader state must have exactly the keys ['epoch', 'position'], got {got}")
        epoch, position = state["epoch"], state["position"]
        if not _is_int(epoch) or epoch < 0:
            raise FP8LabError(f"loader state epoch must be an integer >= 0, got {epoch!r}")
        if not _is_int(position) or not 0 <= position <= self.batches_per_epoch:
            raise FP8LabError(
                f"loader state position must be an integer in [0, {self.batches_per_epoch}] (batches per epoch with "
                f"batch_size {self.batch_size} x world_size {self.world_size}), got {position!r}; "
                "resume with the batch size and world size of the checkpointed run"
            )
        if int(epoch) != self._epoch:
            self._order = self._epoch_order(int(epoch))
        self._epoch, self._position = int(epoch), int(position)


def eval_batches(split: Split, *, batch_size: int, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first num_batches * batch_size sequences of `split` in file order, as fixed batches.

    Uses fewer batches when the split is shorter (at least one); every run thus sees the same data.
    """
    for name, value in (("batch_size", batch_size), ("num_batches", num_batches)):
        if not _is_int(value) or value < 1:
            raise FP8LabError(f"{name} must be a positive integer, got {value!r}")
    available = len(split) // batch_size
    if available == 0:
        raise FP8LabError(
            f"data split {split.name!r} in {split.path} has {len(split)} sequences, fewer than one eval batch of "
            f"{batch_size}; lower the eval batch size or prepare more data"
        )
    count = min(num_batches, available)
    windows = split.gather(np.arange(count * batch_size))
    return [_to_pair(windows[i * batch_size : (i + 1) * batch_size]) for i in range(count)]
