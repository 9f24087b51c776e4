"""Tests for models/training/data/corpus.py: the stdlib file list, the held-out split and the manifest."""

import random

import pytest

from models.training.data.corpus import corpus_manifest, read_text, split_files, stdlib_files, stdlib_root


@pytest.fixture(scope="module")
def root():
    return stdlib_root()


@pytest.fixture(scope="module")
def files():
    return stdlib_files()


def relative_parts(path, root):
    return path.relative_to(root).parts


def test_stdlib_files_excludes_tests_and_site_packages(files, root):
    assert len(files) > 100
    for path in files:
        parts = relative_parts(path, root)
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), path
        assert path.suffix == ".py" and not path.name.startswith("test_"), path
    relative = [path.relative_to(root).as_posix() for path in files]
    assert relative == sorted(relative)
    assert root / "os.py" in files


def test_include_tests_adds_test_files(files, root):
    with_tests = stdlib_files(include_tests=True)
    assert set(files) < set(with_tests)
    assert any("test" in relative_parts(path, root) for path in with_tests)


def test_read_text_is_exact(root):
    path = root / "os.py"
    assert read_text(path).encode("utf-8") == path.read_bytes()


def test_split_is_deterministic_and_disjoint(files, root):
    train, heldout = split_files(files, root)
    shuffled = list(files)
    random.Random(1).shuffle(shuffled)
    assert split_files(shuffled, root) == (train, heldout)
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(files)
    assert 0 < len(heldout) < 0.1 * len(files)
    assert split_files(files, root, seed=1) != (train, heldout)


def test_split_assignment_does_not_depend_on_other_files(files, root):
    _, heldout = split_files(files, root)
    _, heldout_of_half = split_files(files[::2], root)
    assert set(heldout_of_half) == set(heldout) & set(files[::2])


def test_heldout_never_empty(files, root):
    train, heldout = split_files(files[:2], root, heldout_fraction=1e-9)
    assert len(train) == 1 and len(heldout) == 1


def test_manifest_fields_and_hash(files, root):
    train, heldout = split_files(files, root)
    manifest = corpus_manifest(train, heldout, root)
    assert manifest["include_tests"] is False
    assert manifest["stdlib_root"] == str(root)
    assert manifest["python_version"].count(".") == 2
    assert manifest["implementation"]
    assert manifest["splits"]["train"]["files"] == len(train)
    assert manifest["splits"]["heldout"]["bytes"] == sum(path.stat().st_size for path in heldout)
    assert "tokens" not in manifest["splits"]["train"]
    assert corpus_manifest(list(reversed(train)), heldout, root) == manifest
    changed = corpus_manifest(train[1:], heldout, root)
    assert changed["splits"]["train"]["sha256"] != manifest["splits"]["train"]["sha256"]
    assert changed["splits"]["heldout"]["sha256"] == manifest["splits"]["heldout"]["sha256"]


def test_manifest_counts_tokens_with_a_tokenizer(files, root):
    from models.weights.tokenizer import encode_text, train_code_tokenizer

    sample = files[:5]
    tokenizer = train_code_tokenizer((read_text(path) for path in sample), vocab_size=300)
    manifest = corpus_manifest(sample[:3], sample[3:], root, tokenizer=tokenizer, include_tests=True)
    assert manifest["include_tests"] is True
    expected = sum(len(encode_text(tokenizer, read_text(path))) for path in sample[:3])
    assert manifest["splits"]["train"]["tokens"] == expected > 0
