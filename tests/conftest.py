"""Shared fixtures: a real (embedded) multi-domain corpus, a small trained tokenizer, MDS shards."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


SPLIT = dict(seed=0, val_fraction=0.1, test_fraction=0.1)  # shared by the tokenizer and data prep


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    from llmshearing.data.embedded_corpus import build_embedded_corpus

    return build_embedded_corpus(tmp_path_factory.mktemp("corpus"), max_chars_per_domain=300_000)


@pytest.fixture(scope="session")
def small_tokenizer(corpus_dir, tmp_path_factory):
    from llmshearing.data.train_tokenizer import train_tokenizer

    return str(train_tokenizer(corpus_dir, tmp_path_factory.mktemp("tok"), vocab_size=512, **SPLIT))


@pytest.fixture(scope="session")
def mds_data(corpus_dir, small_tokenizer, tmp_path_factory):
    """Prepared MDS data: 3 domains (code, docstrings, reference), sequences of 64 tokens, train/val/test."""
    from llmshearing.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("mds") / "data"
    prepare_dataset(corpus_dir, out, small_tokenizer, 64, **SPLIT, max_doc_chars=4000, progress=False)
    return str(out)
