"""The bench's prompt sets: HumanEval prompts and held-out stdlib snippets, exactly as many as asked."""

from models.training.data.corpus import read_text, split_files, stdlib_files, stdlib_root
from services.bench.common import humaneval_prompts, stdlib_snippets


def test_snippet_count_is_respected_including_zero():
    assert stdlib_snippets(0) == []  # `sdsat bench --heldout-snippets 0` runs HumanEval prompts only
    three = stdlib_snippets(3)
    assert len(three) == 3 and all(0 < len(s) <= 1200 and s.endswith("\n") for s in three)


def test_snippets_come_from_the_heldout_split():
    _, heldout = split_files(stdlib_files(), stdlib_root(), heldout_fraction=0.02, seed=0)
    heads = {read_text(p)[:200] for p in heldout}  # the bytes the bench reads
    assert all(s[:200] in heads for s in stdlib_snippets(4))


def test_humaneval_prompts_are_the_first_n():
    prompts = humaneval_prompts(3)
    assert len(prompts) == 3 and prompts[0].startswith("from typing import List")
