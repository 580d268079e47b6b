"""acip.data: sources, packing, resumable training batches, a new kind of source, errors.

The built-in corpora are fetched once (pip download of the gensim wheel, ~28 MB) and cached; later runs are offline.
"""

import itertools
import json

import pandas as pd
import pytest
import torch
from conftest import tiny_tokenizer

from acip import corpora, data

datasets = pytest.importorskip("datasets")

DOCS = [
    "The albedo of fresh snow is high.\nThat of charcoal is low.\n\nDeep cavities approach zero.",
    "Aristotle (384–322 BC) was a Greek philosopher – born in Stagira.",
    "Lincoln led the United States through its Civil War; he was assassinated in 1865.",
]


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (no model weights)."""
    from transformers import AutoTokenizer

    from acip import default_model

    try:
        folder = default_model.smollm2_dir()
    except ImportError as error:
        pytest.skip(str(error))
    return AutoTokenizer.from_pretrained(folder, gguf_file=default_model.GGUF_FILE)


def expected_blocks(tokenizer, docs, block_size):
    """Packing done by hand: documents joined with EOS between them, cut, tail dropped."""
    ids = []
    for i, doc in enumerate(docs):
        ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(doc, add_special_tokens=False)["input_ids"]
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


def write_sources(folder, docs, field="text"):
    """The same documents as .txt files (one per document), .jsonl, .json and .parquet; returns the source specs."""
    for i, doc in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(doc + "\n")  # a final newline, as editors write it
    with open(folder / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(docs))
    (folder / "docs.json").write_text(json.dumps([{field: doc} for doc in docs]))
    pd.DataFrame({field: docs}).to_parquet(folder / "docs.parquet")
    return [str(folder / name) for name in ("doc*.txt", "docs.jsonl", "docs.json", "docs.parquet")]


# -- packing and file formats ----------------------------------------------------------------------------------------


def test_file_formats_give_the_same_blocks(tmp_path, tokenizer):
    expected = expected_blocks(tokenizer, DOCS, 8)
    assert len(expected) >= 5
    for source in write_sources(tmp_path, DOCS):
        assert torch.equal(data.load_blocks(source, tokenizer, 8), expected), source
    single = tmp_path / "doc0.txt"
    assert torch.equal(data.load_blocks(single, tokenizer, 4), expected_blocks(tokenizer, DOCS[:1], 4))


def test_text_field_and_max_blocks(tmp_path, tokenizer):
    _, jsonl, _, parquet = write_sources(tmp_path, DOCS, field="content")
    blocks = data.load_blocks(jsonl, tokenizer, 8, text_field="content")
    assert torch.equal(blocks, data.load_blocks(parquet, tokenizer, 8, text_field="content"))
    assert torch.equal(data.load_blocks(jsonl, tokenizer, 8, max_blocks=2, text_field="content"), blocks[:2])
    with pytest.raises(ValueError, match="no field 'text'"):
        data.load_blocks(jsonl, tokenizer, 8)


# -- built-in corpora ------------------------------------------------------------------------------------------------


def test_builtin_blocks(tokenizer):
    blocks = data.load_blocks("wiki-validation", tokenizer, 512)
    assert blocks.dtype == torch.long and blocks.shape[1] == 512 and len(blocks) > 150
    assert torch.equal(data.load_blocks("wiki-validation", tokenizer, 512, max_blocks=3), blocks[:3])
    assert len(data.load_blocks("lee", tokenizer, 512)) > 100
    validation = [article["text"] for article in corpora.wikipedia_articles("validation")]
    assert list(data.documents("wiki-validation")) == validation


# -- training batches ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_source(tmp_path):
    """Ten-odd blocks of 16 tokens: enough for several epochs of batches of 3."""
    return write_sources(tmp_path, DOCS * 2)[1]


def test_train_batches_resume(small_source, tokenizer):
    batches = data.TrainBatches(small_source, tokenizer, 16, 3, seed=7)
    per_epoch = batches.batches_per_epoch
    assert batches.num_blocks >= 6 and per_epoch == batches.num_blocks // 3 >= 2
    stream = batches.batches()
    run = [next(stream) for _ in range(3 * per_epoch + 1)]
    assert all(b.shape == (3, 16) and b.dtype == torch.long for b in run)
    for start in range(len(run)):  # across epoch boundaries, and from a fresh object as a resumed run has
        resumed = data.TrainBatches(small_source, tokenizer, 16, 3, seed=7).batches(start=start)
        assert all(torch.equal(next(resumed), expected) for expected in run[start:])
    blocks = {tuple(b.tolist()) for b in batches.blocks}
    epochs = [torch.cat(run[e * per_epoch : (e + 1) * per_epoch]) for e in range(3)]
    for epoch in epochs:  # each epoch draws blocks without repetition
        rows = [tuple(r.tolist()) for r in epoch]
        assert len(set(rows)) == len(rows) and set(rows) <= blocks
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])  # and a fresh order each epoch
    other = next(data.TrainBatches(small_source, tokenizer, 16, 3, seed=8).batches(start=0))
    assert not torch.equal(other, run[0])


def test_train_batches_on_a_builtin_corpus(tokenizer):
    batches = data.TrainBatches("lee", tokenizer, 256, 4, seed=0)
    assert batches.num_blocks > 200
    assert next(iter(batches)).shape == (4, 256)


# -- the Hub path ----------------------------------------------------------------------------------------------------


HUB_DOCS = [f"{doc} (copy {i})" for i in range(4) for doc in DOCS]


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from memory; records its calls."""
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        calls.append((name, config, split, streaming))
        rows = {"text": HUB_DOCS, "url": ["u"] * len(HUB_DOCS)}
        return datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=2)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_blocks(fake_hub, tokenizer):
    blocks = data.load_blocks("hf:allenai/c4:en:validation", tokenizer, 16)
    assert torch.equal(blocks, expected_blocks(tokenizer, HUB_DOCS, 16))
    assert fake_hub == [("allenai/c4", "en", "validation", True)]
    data.load_blocks("hf:some/corpus", tokenizer, 16, max_blocks=1)
    assert fake_hub[-1] == ("some/corpus", None, "train", True)


def test_hub_train_batches_resume(fake_hub, tokenizer):
    batches = data.TrainBatches(data.C4, tokenizer, 16, 4, seed=3, shuffle_buffer=5)
    assert batches.num_blocks is None and batches.batches_per_epoch is None
    per_epoch = len(expected_blocks(tokenizer, HUB_DOCS, 16)) // 4  # shuffling documents keeps the token count
    stream = batches.batches()
    run = [next(stream) for _ in range(2 * per_epoch + 1)]  # three passes over the stream
    assert fake_hub == [("allenai/c4", "en", "train", True)] * 3
    assert all(b.shape == (4, 16) for b in run)
    for start in (0, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch):
        resumed = data.TrainBatches(data.C4, tokenizer, 16, 4, seed=3, shuffle_buffer=5).batches(start=start)
        assert all(torch.equal(next(resumed), expected) for expected in run[start:])
    first, second = torch.stack(run[:per_epoch]), torch.stack(run[per_epoch : 2 * per_epoch])
    assert not torch.equal(first, second)  # reshuffled per epoch
    assert not torch.equal(first.flatten()[:64], expected_blocks(tokenizer, HUB_DOCS, 16).flatten()[:64])


# -- a new kind of source -------------------------------------------------------------------------------------------


def numbered_documents(spec, text_field="text", seed=None, epoch=0, buffer_size=10_000):
    """A made-up source "numbers:N": N documents; shuffled per (seed, epoch) when streamed."""
    docs = [f"w{3 + i % 90} w{4 + i % 80} w{5 + i % 70}" for i in range(int(spec.removeprefix("numbers:")))]
    if seed is not None:
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        docs = [docs[i] for i in order]
    return iter(docs)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_new_source_is_one_function_and_one_table_entry(monkeypatch, streamed):
    tokenizer = tiny_tokenizer()
    entry = (lambda spec: spec.startswith("numbers:"), numbered_documents, streamed)
    monkeypatch.setattr(data, "SOURCES", [entry, *data.SOURCES])
    docs = list(numbered_documents("numbers:40"))
    assert list(data.documents("numbers:40")) == docs
    assert torch.equal(data.load_blocks("numbers:40", tokenizer, 8), expected_blocks(tokenizer, docs, 8))
    batches = data.TrainBatches("numbers:40", tokenizer, 8, 2, seed=1)
    assert (batches.num_blocks is None) == streamed
    run = list(itertools.islice(batches.batches(), 25))  # nearly three epochs of 9 batches
    resumed = data.TrainBatches("numbers:40", tokenizer, 8, 2, seed=1).batches(start=20)
    assert all(torch.equal(next(resumed), expected) for expected in run[20:])


def test_a_malformed_hub_source_fails_before_anything_is_read(fake_hub, tokenizer):
    with pytest.raises(ValueError, match="hf:NAME"):
        data.TrainBatches("hf:a:b:c:d", tokenizer, 16, 4)
    assert fake_hub == []


# -- errors ----------------------------------------------------------------------------------------------------------


def test_unknown_sources(tmp_path, tokenizer):
    for source in ("wiki-test", str(tmp_path / "missing.txt"), str(tmp_path / "*.jsonl")):
        with pytest.raises(ValueError, match="unknown data source"):
            data.load_blocks(source, tokenizer, 8)
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"table\.csv.*unsupported file type \.csv"):
        data.TrainBatches(tmp_path / "table.csv", tokenizer, 8, 2)
    with pytest.raises(ValueError, match="is a folder"):
        data.load_blocks(tmp_path, tokenizer, 8)
    with pytest.raises(ValueError, match="hf:NAME"):
        data.load_blocks("hf:", tokenizer, 8)


def test_empty_and_short_sources(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    for name in ("empty.txt", "blank.jsonl"):
        with pytest.raises(ValueError, match=rf"{name}' is empty"):
            data.load_blocks(tmp_path / name, tokenizer, 8)
    (tmp_path / "short.txt").write_text("Just a few words.")
    with pytest.raises(ValueError, match=r"short\.txt' is too short: \d+ tokens .* fewer than one block of 512"):
        data.TrainBatches(tmp_path / "short.txt", tokenizer, 512, 1)
    (tmp_path / "two.txt").write_text(" ".join(["word"] * 20))
    with pytest.raises(ValueError, match=r"two\.txt' is too short: 2 blocks of 8 tokens, fewer than one batch of 4"):
        data.TrainBatches(tmp_path / "two.txt", tokenizer, 8, 4)
    with pytest.raises(ValueError, match="block_size"):
        data.load_blocks("lee", tokenizer, 0)
