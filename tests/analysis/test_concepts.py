import pytest
import torch

from midisc.analysis.concepts import (CONCEPT_DIR, ConceptError, available, corpus_sample, load_modules, ranked, read_texts,
                             selectivity)

SHIPPED = ["commands", "conversational", "emotions", "formal", "numbers", "punctuation", "questions", "statements",
           "technical", "temporal"]


def test_the_ten_shipped_modules_hold_at_least_50_distinct_examples_each():
    assert available(CONCEPT_DIR) == SHIPPED
    modules = load_modules(CONCEPT_DIR)
    for name, texts in modules.items():
        lines = [line for line in (CONCEPT_DIR / f"{name}.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
        assert len(texts) == len(lines) >= 50, name
    assert all(t.endswith("?") for t in modules["questions"])
    everything = [t for texts in modules.values() for t in texts]
    assert len(everything) == len(set(everything))


def test_reading_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# a comment\n\nfirst text\n  second text  \nfirst text\n   # indented comment\n")
    assert read_texts(path) == ["first text", "second text"]
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ConceptError, match="holds no texts"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConceptError, match="cannot read"):
        read_texts(tmp_path / "binary.txt")
    with pytest.raises(ConceptError, match="cannot read"):
        read_texts(tmp_path / "missing.txt")


def test_unknown_modules_are_named_with_the_valid_ones():
    with pytest.raises(ConceptError, match="unknown concept 'emotion'; modules in .*: commands, conversational"):
        load_modules(CONCEPT_DIR, ["emotion"])


def naive_auroc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_the_pairwise_definition_with_ties():
    torch.manual_seed(0)
    concept = torch.relu(torch.randn(13, 9)).round(decimals=1)  # many exact ties, zeros included
    contrast = torch.relu(torch.randn(21, 9) - 0.3).round(decimals=1)
    scores = selectivity(concept, contrast)
    for f in range(9):
        assert scores.auroc[f].item() == pytest.approx(naive_auroc(concept[:, f].tolist(), contrast[:, f].tolist()))
    assert scores.fire_concept[0] == pytest.approx((concept[:, 0] > 0).float().mean())
    assert scores.mean_contrast[3] == pytest.approx(contrast[:, 3].mean())


def test_a_perfect_detector_ranks_first_and_silent_features_score_chance():
    concept, contrast = torch.zeros(5, 4), torch.zeros(8, 4)
    concept[:, 2] = 1.0                 # fires on every concept text only
    concept[:3, 1] = 1.0                # fires on some concept texts only
    contrast[:, 3], concept[:, 3] = 1.0, 1.0  # fires everywhere
    rows = ranked(selectivity(concept, contrast), top=4)
    assert [r["feature_index"] for r in rows] == [2, 1, 0, 3]
    assert rows[0]["score"] == 1.0 and rows[2]["score"] == 0.5 and rows[3]["score"] == 0.5
    assert rows[0]["fire_rate_concept"] == 1.0 and rows[0]["fire_rate_contrast"] == 0.0 and rows[0]["rank"] == 0
    with pytest.raises(ConceptError, match="texts on both sides"):
        selectivity(concept, contrast[:0])


def test_corpus_sample_is_sentences_of_reasonable_length_and_repeatable():
    docs = ["Short. " + "This sentence is long enough to count as one. " * 3 + "Another fine sentence that counts here!"]
    sample = corpus_sample(docs, 5, seed=1)
    assert sample == corpus_sample(docs, 5, seed=1) and "Short." not in sample
    assert set(sample) == {"This sentence is long enough to count as one.", "Another fine sentence that counts here!"}
