"""The training loader: deterministic, resumable, rank-sharded batches from a Split.

The order of epoch e depends only on (seed, e), so the loader state is just two integers and
a resumed run sees exactly the batches an uninterrupted one would have seen. Batch (e, p) is a
pure function of the data and those numbers, which is also what lets a background thread
compute batches ahead (`prefetch`) without changing a single one of them.
"""

from __future__ import annotations

import functools
import queue
import threading
import weakref

import numpy as np
import torch

from fp8lab.data.dataset import Split
from fp8lab.data.flags import FLAG_DOC_START, FLAG_LOSS
from fp8lab.errors import FP8LabError

IGNORE_INDEX = -100  # the target id that carries no loss (torch cross_entropy's default ignore_index)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _to_pair(
    windows: np.ndarray, *, pad_id: int | None = None, flags: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    # Converting each half straight from the narrow dtype writes the same bytes as converting the
    # window once and copying the inputs, but leaves both tensors contiguous.
    inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))
    shifted = windows[:, 1:]
    targets = shifted.astype(np.int64)
    if pad_id is not None:
        # Inputs keep the pad id (a valid embedding row; its outputs are all masked), targets lose it.
        targets[shifted == pad_id] = IGNORE_INDEX
    if flags is not None:
        # Target j is token j + 1: its loss bit sits in flags[:, j + 1] (prompts, padding: no loss).
        targets[(flags[:, 1:] & FLAG_LOSS) == 0] = IGNORE_INDEX
    return inputs, torch.from_numpy(targets)


def _doc_ids(windows: np.ndarray, *, flags: np.ndarray | None, eos_id: int | None) -> torch.Tensor:
    """(B, seq_len) int32: the 0-based document of each input position within its window. A
    document starts where the flags say (instruction data), else at each EOS input: the EOS that
    ends one document is the next one's BOS, so every position lies in exactly one "EOS + document"
    sequence and the masked window computes what those sequences would compute one by one."""
    starts = np.empty((len(windows), windows.shape[1] - 1), dtype=np.int32)
    starts[:, 0] = 0  # whatever it is, the first position belongs to the window's first document
    if flags is not None:
        starts[:, 1:] = (flags[:, 1:-1] & FLAG_DOC_START) != 0
    else:
        starts[:, 1:] = windows[:, 1:-1] == eos_id
    return torch.from_numpy(np.cumsum(starts, axis=1, dtype=np.int32))


def _check_documents(split: Split) -> None:
    if not split.has_flags and split.eos_id is None:
        raise FP8LabError(f"data {split.path} has no EOS id and no flags files, so documents cannot be told apart "
                          "for document masking; prepare it with a tokenizer that has an EOS (or --eos-id for .npy "
                          "streams), or turn document masking off")


def _batch(split: Split, windows: np.ndarray, flags: np.ndarray | None, *, documents: bool) -> tuple:
    inputs, targets = _to_pair(windows, pad_id=split.pad_id, flags=flags)
    if not documents:
        return inputs, targets
    return inputs, targets, _doc_ids(windows, flags=flags, eos_id=split.eos_id)


def _epoch_order(epoch: int, *, n: int, seed: int, rank: int, world_size: int, per_rank: int, shuffle: bool):
    perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return perm[rank::world_size][:per_rank]


def _make_batch(split: Split, rows: np.ndarray, *, vocab_size: int | None, pin: bool, documents: bool = False):
    windows = split.take(rows)  # rows come from our own permutation: always in range
    if vocab_size is not None:
        top = int(windows.max())
        if top >= vocab_size:
            raise FP8LabError(
                f"data {split.path} (split {split.name!r}) contains token id {top} but the model's "
                f"vocab_size is {vocab_size}; raise model.vocab_size to at least {top + 1} "
                "or re-tokenize the data"
            )
    batch = _batch(split, windows, split.take_flags(rows) if split.has_flags else None, documents=documents)
    return tuple(t.pin_memory() for t in batch) if pin else batch


def _prefetch_worker(q: queue.Queue, stop: threading.Event, *, make, order_of, epoch, position, per_epoch, batch):
    # Holds no reference to the loader, so a dropped loader is collected and its finalizer stops us.
    order = order_of(epoch)
    while not stop.is_set():
        if position == per_epoch:
            epoch, position = epoch + 1, 0
            order = order_of(epoch)
        try:
            item = (make(order[position * batch : (position + 1) * batch]), None)
        except BaseException as e:  # handed to the consumer, raised there when it asks for this batch
            item = (None, e)
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if item[1] is not None:
            return
        position += 1


class TokenLoader:
    """Endless (inputs, targets) int64 CPU batches of shape (batch_size, seq_len) from `split`;
    with `documents=True`, (inputs, targets, docs): docs is int32 (batch_size, seq_len), the
    0-based document of each input position within its row (from the flags of instruction
    data, else a new document at each EOS input), for document masking in attention.

    Each epoch is a seeded permutation of the split; rank r takes perm[r::world_size], cut to
    the same length on every rank, so no sequence is served twice per epoch across ranks.
    Batches never straddle epochs: the partial tail of each rank's order is dropped.
    Batch p of all ranks together is perm[p*G:(p+1)*G] with G = batch_size x world_size (the
    global batch), and an epoch holds n // G of them: the sequences of each global batch, and
    where epochs end, depend on G only, never on how it splits into ranks (what lets a run
    resume on another rank count; see `reshard_state`).
    Data prepared with padding (a pad id) yields IGNORE_INDEX targets at the padded positions,
    instruction data (flags files) at every target without loss (prompts, padding).

    `prefetch=N` computes up to N batches ahead in a background thread (same batches, same
    state); `pin_memory=True` pins them for fast, asynchronous host-to-GPU copies (needs CUDA).
    The default, synchronous path keeps CPU runs free of threads. `max_seq_len` refuses data
    whose sequences are longer than the model can take.
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
        max_seq_len: int | None = None,
        prefetch: int = 0,
        pin_memory: bool = False,
        documents: bool = False,
    ) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0), ("world_size", world_size, 1)):
            if not _is_int(value) or value < low:
                raise FP8LabError(f"{name} must be an integer >= {low}, got {value!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise FP8LabError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
            if value is not None and (not _is_int(value) or value < 1):
                raise FP8LabError(f"{name} must be a positive integer or None, got {value!r}")
        if not _is_int(prefetch) or prefetch < 0:
            raise FP8LabError(f"prefetch must be an integer >= 0 (batches computed ahead), got {prefetch!r}")
        if pin_memory and not torch.cuda.is_available():
            raise FP8LabError("pin_memory=True needs a CUDA device (pinned host memory is for GPU copies)")
        if max_seq_len is not None and split.seq_len > max_seq_len:
            raise FP8LabError(
                f"data {split.path} has sequences of {split.seq_len} tokens but the model's max_seq_len is "
                f"{max_seq_len}; prepare the data with --seq-len {max_seq_len} or less, or use a longer model"
            )
        if documents:
            _check_documents(split)
        self.split = split
        self.documents = bool(documents)
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
        self.prefetch = int(prefetch)
        self.pin_memory = bool(pin_memory)
        self._order_of = functools.partial(
            _epoch_order,
            n=len(split),
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            per_rank=self._per_rank,
            shuffle=shuffle,
        )
        self._make = functools.partial(_make_batch, split, vocab_size=vocab_size, pin=self.pin_memory,
                                       documents=self.documents)
        self._worker: tuple[queue.Queue, threading.Event, threading.Thread] | None = None
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

    @property
    def global_batch(self) -> int:
        """Sequences one position step serves over all ranks: batch_size x world_size."""
        return self.batch_size * self.world_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return self._order_of(epoch)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The next (inputs, targets) pair, or (inputs, targets, docs) with `documents`; rolls over to
        the next epoch when this one is used up."""
        if self.prefetch:
            batch = self._next_prefetched()
        else:
            if self._position == self.batches_per_epoch:
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
            start = self._position * self.batch_size
            batch = self._make(self._order[start : start + self.batch_size])
        self._position += 1
        return batch

    def _next_prefetched(self) -> tuple[torch.Tensor, ...]:
        if self._position == self.batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        if self._worker is None:
            q: queue.Queue = queue.Queue(maxsize=self.prefetch)
            stop = threading.Event()
            thread = threading.Thread(
                target=_prefetch_worker,
                args=(q, stop),
                kwargs={
                    "make": self._make,
                    "order_of": self._order_of,
                    "epoch": self._epoch,
                    "position": self._position,
                    "per_epoch": self.batches_per_epoch,
                    "batch": self.batch_size,
                },
                name="fp8lab-prefetch",
                daemon=True,
            )
            weakref.finalize(self, stop.set)
            thread.start()
            self._worker = (q, stop, thread)
        batch, error = self._worker[0].get()
        if error is not None:
            self.close()  # the worker stopped at this batch; the next call starts over from it
            raise error
        return batch

    def close(self) -> None:
        """Stop the prefetch thread, if any (a later next_batch starts a new one)."""
        if self._worker is not None:
            _, stop, thread = self._worker
            stop.set()
            thread.join()
            self._worker = None

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
        self.close()  # batches computed ahead belong to the old position
        if int(epoch) != self._epoch:
            self._order = self._epoch_order(int(epoch))
        self._epoch, self._position = int(epoch), int(position)


def reshard_state(state: dict, *, global_batch: int, to: TokenLoader) -> dict:
    """`state` of a loader whose global batch was `global_batch` (its batch_size x world_size),
    as loader `to`'s state at the same place in the data: the same epoch, and the same number of
    sequences (hence tokens) of that epoch's permutation served. Exact, because which sequences
    a position covers depends on the global batch only (see TokenLoader); refused when that
    count is not a whole number of `to`'s global batches. An epoch served to its end stays
    at its end (the next batch opens the next epoch)."""
    if global_batch == to.global_batch or not isinstance(state, dict):
        return state  # load_state_dict checks it
    position = state.get("position")
    if not _is_int(position) or position < 0:
        return state
    if position == len(to.split) // global_batch:  # that epoch was used up (its tail dropped): so it is here
        return {**state, "position": to.batches_per_epoch}
    served = position * global_batch
    if served % to.global_batch:
        raise FP8LabError(
            f"the checkpoint's data position ({served} sequences into epoch {state.get('epoch')}, in global batches of "
            f"{global_batch}) is not a whole number of this run's global batches of {to.global_batch} "
            f"(micro_batch_size {to.batch_size} x {to.world_size} rank(s)); resume with a global batch that divides "
            f"{served}, e.g. the checkpoint's {global_batch}, or from a checkpoint whose position it divides"
        )
    return {**state, "position": served // to.global_batch}


def eval_batches(
    split: Split, *, batch_size: int, num_batches: int, documents: bool = False
) -> list[tuple[torch.Tensor, ...]]:
    """The first num_batches * batch_size sequences of `split` in file order, as fixed batches:
    (inputs, targets), or (inputs, targets, docs) with `documents` (as TokenLoader gives them).

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
    if documents:
        _check_documents(split)
    count = min(num_batches, available)
    rows = np.arange(count * batch_size)
    windows = split.gather(rows)
    flags = split.take_flags(rows) if split.has_flags else None
    return [_batch(split, windows[i * batch_size : (i + 1) * batch_size],
                   None if flags is None else flags[i * batch_size : (i + 1) * batch_size], documents=documents)
            for i in range(count)]
