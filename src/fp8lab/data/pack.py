"""From token streams to fixed windows: the train/val split, packing (or padding) and sharding.

Everything here is a pure function of the order in which documents arrive, which is what
makes `fp8lab prepare` reproducible byte for byte.
"""

from __future__ import annotations

import numpy as np

from fp8lab.data.dataset import DatasetWriter


def row_is_val(start: int, count: int, *, val_fraction: float) -> np.ndarray:
    """Row i (a document, or a row of a 2-D array) is val when round(f * (i + 1)) steps up: every
    1/f-th one, round(f * n) of the first n, evenly spread. Counting documents rather than their
    sizes keeps long and short documents alike in val; it depends only on the global index."""
    i = np.arange(start, start + count, dtype=np.float64)
    return np.floor(val_fraction * (i + 1) + 0.5) > np.floor(val_fraction * i + 0.5)


class Splitter:
    """The document-level train/val split: row_is_val over the documents in input order."""

    def __init__(self, *, val_fraction: float) -> None:
        self.val_fraction = val_fraction
        self.seen = 0

    def route(self, count: int) -> np.ndarray:
        """True for each of the next `count` documents that goes to val."""
        out = row_is_val(self.seen, count, val_fraction=self.val_fraction)
        self.seen += count
        return out


class ShardSink:
    """Streams the windows of one split into shards of at most `rows_per_shard` sequences; with
    `flags`, each shard gets its flags file (fp8lab.data.flags) and `add` takes the flags too."""

    def __init__(self, *, writer: DatasetWriter, split: str, rows_per_shard: int, flags: bool = False) -> None:
        self.writer, self.split = writer, split
        self.rows_per_shard = max(1, rows_per_shard)
        self.stream = None
        self.flags, self.flags_stream = flags, None
        self.sequences = 0

    def add(self, windows: np.ndarray, flags: np.ndarray | None = None) -> None:
        """Append (n, seq_len + 1) windows (and their flags), starting a new shard whenever one is full."""
        if (flags is not None) != self.flags:
            raise ValueError(f"ShardSink(flags={self.flags}).add was given flags={flags is not None}")
        done = 0
        while done < len(windows):
            if self.stream is None:
                self.stream = self.writer.open_shard(self.split)
                self.flags_stream = self.writer.open_flags(self.stream) if self.flags else None
            take = min(self.rows_per_shard - self.stream.count, len(windows) - done)
            self.stream.append(windows[done : done + take])
            if flags is not None:
                self.flags_stream.append(flags[done : done + take])
            done += take
            if self.stream.count == self.rows_per_shard:
                self.close()
        self.sequences += len(windows)

    def close(self) -> None:
        """Finish the last, partial shard (idempotent)."""
        if self.stream is not None:
            self.writer.close_shard(self.split, self.stream, flags=self.flags_stream)
            self.stream = self.flags_stream = None


class Packer:
    """Documents of one split, each already followed by its EOS, cut into windows of seq_len + 1.

    pad_id None: packed, the stream runs across documents and only the final partial window is
    dropped. pad_id set (--no-pack): each document gets its own windows, the last one padded;
    a final piece of a single token has no target and is dropped.
    """

    def __init__(self, *, sink: ShardSink, window: int, pad_id: int | None) -> None:
        self.sink, self.window, self.pad_id = sink, window, pad_id
        self.carry = np.empty(0, dtype=np.uint32)  # packed: stream tail; no-pack: open document's tail
        self.documents = 0
        self.tokens = 0  # real tokens (EOS included) placed in windows
        self.pad_targets = 0
        self.dropped = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray, *, first_continues: bool, last_open: bool) -> None:
        """Documents as one flat id array (each closed one ending in EOS) and their lengths, in order.

        first_continues: the first goes on with the previous call's open document;
        last_open: the last is not finished (no EOS yet; more of it comes in the next call).
        """
        if len(lengths) == 0:
            return
        self.documents += len(lengths) - int(first_continues)
        flat = flat.astype(np.uint32, copy=False)
        if self.pad_id is None:
            stream = np.concatenate([self.carry, flat]) if len(self.carry) else flat
            n = len(stream) // self.window
            if n:
                self.sink.add(stream[: n * self.window].reshape(n, self.window))
                self.tokens += n * self.window
            self.carry = stream[n * self.window :].copy()
        else:
            self._add_padded(flat, lengths, first_continues=first_continues, last_open=last_open)

    def _add_padded(self, flat: np.ndarray, lengths: np.ndarray, *, first_continues: bool, last_open: bool) -> None:
        w, out = self.window, []
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        last = len(lengths) - 1
        for j, (s, n) in enumerate(zip(starts, lengths.tolist(), strict=True)):
            doc = flat[s : s + n]
            if j == 0 and first_continues and len(self.carry):
                doc = np.concatenate([self.carry, doc])
            self.carry = self.carry[:0]
            full = len(doc) // w
            if full:
                out.append(doc[: full * w].reshape(full, w))
                self.tokens += full * w
            rest = doc[full * w :]
            if last_open and j == last:
                self.carry = rest.copy()
            elif len(rest) >= 2:
                padded = np.full((1, w), self.pad_id, dtype=np.uint32)
                padded[0, : len(rest)] = rest
                out.append(padded)
                self.tokens += len(rest)
                self.pad_targets += w - len(rest)
            else:
                self.dropped += len(rest)
        if out:
            self.sink.add(np.concatenate(out))

    def finish(self) -> None:
        """End of input: a packed stream's partial last window is dropped (readers close every document,
        so a --no-pack carry is empty here); the last shard is written."""
        self.dropped += len(self.carry)
        self.carry = self.carry[:0]
        self.sink.close()
