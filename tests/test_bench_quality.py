"""bench/quality.py's pure parts: the agreement measure, the shipped prompts and text, format names."""

from __future__ import annotations

import pytest

from bench.quality import DATA, agreement, load_prompts, run_quality


def test_agreement_counts_tokens_up_to_the_first_divergence() -> None:
    reference = [["a", "b", "c", "d"], ["x", "y", "z", "w"]]
    assert agreement(reference, reference) == (1.0, 1.0)
    # 2 of 4 before the divergence (later matches do not count), then 4 of 4.
    assert agreement(reference, [["a", "b", "X", "d"], ["x", "y", "z", "w"]]) == (6 / 8, 0.5)
    assert agreement(reference, [["Q", "b", "c", "d"], ["x", "y", "z"]]) == (3 / 8, 0.0)


def test_shipped_prompts_and_text() -> None:
    prompts = load_prompts(64)
    assert len(set(prompts)) == 64 and all(p.strip() for p in prompts)
    assert load_prompts(3) == prompts[:3]
    with pytest.raises(ValueError, match="only 64 quality prompts"):
        load_prompts(65)
    assert len((DATA / "quality_text.txt").read_text().split()) > 500


def test_unknown_format_is_refused_before_any_launch() -> None:
    with pytest.raises(ValueError, match="unknown formats \\['fp8'\\]"):
        run_quality("unused", ["int4", "fp8"])
