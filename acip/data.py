"""Text for ACIP: a text source gives documents; documents are packed into blocks of token ids.

A source is a string, and each kind of source is one reader function in :data:`SOURCES`:

* a built-in offline corpus: ``"wiki-train"``, ``"wiki-validation"`` (the Wikipedia sample split by article) or
  ``"lee"`` (the Lee background news corpus, 300 short articles); :mod:`acip.corpora` prepares them;
* a local file, or a glob of files, ending in ``.txt`` (a whole file is one document), ``.jsonl``/``.json`` (one
  document per record, field ``text`` unless told otherwise) or ``.parquet`` (column ``text``);
* a Hub dataset, streamed: ``"hf:NAME[:CONFIG[:SPLIT]]"``, e.g. :data:`C4` (the paper's calibration set).

Documents are tokenized, joined with the tokenizer's EOS token between them and cut into blocks of exactly
``block_size`` tokens; :func:`load_blocks` gives all blocks in order (evaluation), :class:`TrainBatches` a seeded,
resumable, endless stream of batches (training).
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from . import corpora

# The built-in corpora: name -> its documents.
CORPORA = {
    "wiki-train": lambda: [article["text"] for article in corpora.wikipedia_articles("train")],
    "wiki-validation": lambda: [article["text"] for article in corpora.wikipedia_articles("validation")],
    "lee": corpora.lee_documents,
}
C4 = "hf:allenai/c4:en:train"

_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TOKENIZE_CHUNK = 64  # documents per tokenizer call: fast tokenizers parallelise within a call


# -- sources ---------------------------------------------------------------------------------------------------------


def corpus_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """The documents of a built-in corpus (plain text: there is no field to choose)."""
    return iter(CORPORA[spec]())


def file_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """The documents of a file or glob of files: a whole .txt file, a .jsonl/.json record or a .parquet row each."""
    if os.path.isdir(spec):
        raise ValueError(f"data source {spec!r} is a folder: pass a file, or a glob such as {spec}/*.txt")
    is_glob = any(c in spec for c in "*?[")
    paths = sorted(glob.glob(spec)) if is_glob else [spec] if os.path.isfile(spec) else []
    if not paths:
        raise ValueError(
            f"unknown data source {spec!r}: not a built-in corpus ({', '.join(CORPORA)}), not an existing file "
            f"(or glob of files), and not hf:NAME[:CONFIG[:SPLIT]]"
        )
    suffixes = {Path(p).suffix.lower() for p in paths}
    if len(suffixes) != 1 or not suffixes <= _FILE_BUILDERS.keys():
        raise ValueError(
            f"data source {spec!r}: unsupported file type {', '.join(sorted(suffixes))}; "
            f"expected one of {', '.join(_FILE_BUILDERS)} (all files alike)"
        )
    import datasets

    builder = _FILE_BUILDERS[suffixes.pop()]
    # sample_by="document": one .txt file is one document, exactly as one JSONL record or parquet row is.
    options = {"sample_by": "document"} if builder == "text" else {}
    # Streaming reads the files in order and writes no Arrow cache.
    rows = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True, **options)
    return _rows_text(rows, "text" if builder == "text" else text_field, spec)


def hub_documents(
    spec: str, text_field: str = "text", seed: int | None = None, epoch: int = 0, buffer_size: int = 10_000
) -> Iterator[str]:
    """The documents of a Hub dataset ``hf:NAME[:CONFIG[:SPLIT]]``, streamed; with a seed, shuffled anew per epoch."""
    name, config, split = _parse_hub_spec(spec)

    def rows():  # a generator, so that the stream opens on the first read, not when the string is checked
        import datasets

        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        if seed is not None:
            stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
            stream.set_epoch(epoch)
        yield from stream

    return _rows_text(rows(), text_field, spec)


# Every kind of source: (names one?, reader, streamed), the first match reads the source string. A reader checks the
# string when called (ValueError if it names nothing readable) and returns the documents in stored order. A streamed
# reader also takes seed, epoch and buffer_size and opens its stream only when iterated; TrainBatches reads it afresh
# every epoch, where it packs any other source once and permutes the blocks.
SOURCES = [
    (lambda spec: spec in CORPORA, corpus_documents, False),
    (lambda spec: spec.startswith("hf:"), hub_documents, True),
    (lambda spec: True, file_documents, False),  # last: anything else must be a path
]


def documents(source: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """The documents of a source in their stored order (a Hub dataset is streamed, not shuffled)."""
    read, _ = _reader(source)
    return read(os.fspath(source), text_field)


def hub_dataset_name(source: str | os.PathLike) -> str | None:
    """The Hub dataset a source names (``hf:NAME[...]`` gives NAME); None for built-in corpora and files."""
    spec = os.fspath(source)
    return _parse_hub_spec(spec)[0] if spec.startswith("hf:") else None


def _reader(source: str | os.PathLike):
    spec = os.fspath(source)
    return next((read, streamed) for names, read, streamed in SOURCES if names(spec))


def _parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"data source {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]], e.g. {C4}")
    name, config, split = (parts + [None, None])[:3]
    return name, config or None, split or "train"


def _rows_text(rows: Iterable[dict], text_field: str, source: str) -> Iterator[str]:
    for row in rows:
        if text_field not in row:
            raise ValueError(f"data source {source!r} has no field {text_field!r} (fields: {', '.join(row)})")
        yield row[text_field]


# -- packing ---------------------------------------------------------------------------------------------------------


def pack(docs: Iterable[str], tokenizer, block_size: int, source: str = "documents") -> Iterator[torch.Tensor]:
    """Blocks of exactly ``block_size`` token ids: documents joined with EOS between them, incomplete tail dropped.

    Raises ValueError (naming ``source``) if the documents cannot fill a single block.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("packing needs a tokenizer with an EOS token (it separates documents)")
    return _pack(docs, tokenizer, block_size, source)


def _pack(docs: Iterable[str], tokenizer, block_size: int, source: str) -> Iterator[torch.Tensor]:
    # Whitespace at the ends is not part of a document: a .txt file's final newline must not change the tokens.
    texts = (doc.strip() for doc in docs if doc is not None)
    texts = (text for text in texts if text)
    buffer: list[int] = []
    n_docs, n_blocks = 0, 0
    while chunk := list(itertools.islice(texts, _TOKENIZE_CHUNK)):
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if n_docs:
                buffer.append(tokenizer.eos_token_id)
            buffer.extend(ids)
            n_docs += 1
        n_full = len(buffer) // block_size
        if n_full:
            blocks = torch.tensor(buffer[: n_full * block_size], dtype=torch.long).view(n_full, block_size)
            del buffer[: n_full * block_size]
            n_blocks += n_full
            yield from blocks
    if n_docs == 0:
        raise ValueError(f"data source {source!r} is empty: it has no non-blank documents")
    if n_blocks == 0:
        raise ValueError(
            f"data source {source!r} is too short: {len(buffer)} tokens in {n_docs} documents, "
            f"fewer than one block of {block_size}"
        )


def load_blocks(
    source: str | os.PathLike, tokenizer, block_size: int, max_blocks: int | None = None, text_field: str = "text"
) -> torch.Tensor:
    """All blocks of a source in order, non-overlapping (at most ``max_blocks``): LongTensor (N, block_size)."""
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be positive or None, got {max_blocks}")
    blocks = pack(documents(source, text_field), tokenizer, block_size, os.fspath(source))
    return torch.stack(list(itertools.islice(blocks, max_blocks)))


class TrainBatches:
    """A deterministic, resumable, endless stream of training batches, each a LongTensor (batch_size, block_size).

    Finite sources (built-in corpora, files) are packed once, then served in epochs, each a fresh permutation of
    the blocks seeded by (seed, epoch); the last incomplete batch of an epoch is dropped. Streamed sources (Hub
    datasets) are read afresh every epoch through a seeded shuffle buffer, reshuffled per epoch.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        tokenizer,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        text_field: str = "text",
        shuffle_buffer: int = 10_000,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.source = os.fspath(source)
        self.tokenizer, self.block_size, self.batch_size = tokenizer, block_size, batch_size
        self.seed, self.text_field, self.shuffle_buffer = seed, text_field, shuffle_buffer
        self._read, streamed = _reader(self.source)
        self.blocks: torch.Tensor | None = None  # all blocks of a finite source; None when streamed
        if streamed:
            self._read(self.source, text_field)  # checks the source string now; the stream opens per epoch
        else:
            blocks = list(pack(self._read(self.source, text_field), tokenizer, block_size, self.source))
            if len(blocks) < batch_size:
                raise ValueError(
                    f"data source {self.source!r} is too short: {len(blocks)} blocks of {block_size} tokens, "
                    f"fewer than one batch of {batch_size}"
                )
            self.blocks = torch.stack(blocks)

    @property
    def num_blocks(self) -> int | None:
        """Blocks in one epoch of a finite source; None for a streamed one."""
        return None if self.blocks is None else len(self.blocks)

    @property
    def batches_per_epoch(self) -> int | None:
        """Full batches in one epoch of a finite source; None for a streamed one."""
        return None if self.blocks is None else len(self.blocks) // self.batch_size

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches from index ``start`` on: exactly what an uninterrupted iteration yields from there."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if self.blocks is None:
            # A stream cannot seek: replay it and skip what was consumed (tokenizing is cheap next to training).
            return itertools.islice(self._streamed_batches(), start, None)
        return self._epoch_batches(start)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """All batches from the first."""
        return self.batches()

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of block indices used in ``epoch`` (finite sources)."""
        import numpy as np  # with the data extra (datasets needs it); the core package does not

        rng = np.random.default_rng([self.seed, epoch])  # a SeedSequence mixes the pair; no ad-hoc arithmetic
        return torch.from_numpy(rng.permutation(self.num_blocks))

    def _epoch_batches(self, start: int) -> Iterator[torch.Tensor]:
        epoch, index = divmod(start, self.batches_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for i in range(index, self.batches_per_epoch):
                yield self.blocks[order[i * self.batch_size : (i + 1) * self.batch_size]]
            epoch, index = epoch + 1, 0

    def _streamed_batches(self) -> Iterator[torch.Tensor]:
        for epoch in itertools.count():
            docs = self._read(self.source, self.text_field, self.seed, epoch, self.shuffle_buffer)
            blocks = pack(docs, self.tokenizer, self.block_size, self.source)
            n_batches = 0
            while len(batch := list(itertools.islice(blocks, self.batch_size))) == self.batch_size:
                n_batches += 1
                yield torch.stack(batch)
            if n_batches == 0:
                raise ValueError(
                    f"data source {self.source!r} is too short: {len(batch)} blocks of {self.block_size} tokens, "
                    f"fewer than one batch of {self.batch_size}"
                )
