"""Mapping Grounding DINO labels back to requested object names (udfs.phrases)."""
from __future__ import annotations

import pytest

from udfs.phrases import label_words, match_phrases, normalize_name, same_word, strict_label


def detected(requested, labels, mode="robust", **kw):
    """Names credited with at least one detection."""
    return [name for name, idx in match_phrases(requested, labels, mode=mode, **kw).items() if idx]


# -- strict: the original's exact membership (SPEC C5) ------------------------------------

@pytest.mark.parametrize("requested,labels,expected", [
    (["cat", "dog"], ["cat", "dog"], ["cat", "dog"]),
    (["cat"], ["cat."], ["cat"]),                     # GroundingDINO's predict removes "."
    (["cat"], ["Cat"], []),                           # case-sensitive
    (["cat"], ["cats"], []),                          # no plural handling
    (["cat", "dog"], ["cat. dog"], []),               # merged label matches neither
    (["hot dog"], ["dog"], []),                       # partial label
    (["zebu"], ["##eb"], []),                         # sub-word piece
    (["people", "game"], ["people", "people game"], ["people"]),   # SPEC C5 log example
    (["cat"], ["cat [SEP]"], []),
])
def test_strict_reproduces_exact_membership(requested, labels, expected):
    assert detected(requested, labels, mode="strict") == expected


def test_strict_returns_all_matching_indices():
    assert match_phrases(["cat", "dog"], ["cat", "dog", "cat."], mode="strict") == {"cat": [0, 2], "dog": [1]}
    assert strict_label("cat. dog.") == "cat dog"


# -- robust ---------------------------------------------------------------------------

@pytest.mark.parametrize("requested,labels,expected", [
    # case and articles
    (["Cat"], ["cat"], ["Cat"]),
    (["cat"], ["A Cat"], ["cat"]),
    (["a cat"], ["cat"], ["a cat"]),
    # plurals, regular and irregular, in either direction
    (["cat"], ["cats"], ["cat"]),
    (["cats"], ["cat"], ["cats"]),
    (["people"], ["person"], ["people"]),
    (["leaves"], ["leaf"], ["leaves"]),
    (["bus"], ["buses"], ["bus"]),
    (["glass"], ["glasses"], ["glass"]),
    (["children"], ["child"], ["children"]),
    (["bird houses"], ["bird house"], ["bird houses"]),
    (["sheep"], ["sheep"], ["sheep"]),
    # punctuation, separators and special tokens
    (["cat"], ["cat."], ["cat"]),
    (["cat"], ["[CLS] cat [SEP]"], ["cat"]),
    (["cat"], [". cat .."], ["cat"]),
    (["bird-house"], ["bird house"], ["bird-house"]),
    (["bird house"], ["bird - house"], ["bird house"]),           # BERT decodes "-" as its own token
    (["bird house"], ["bird-house"], ["bird house"]),
    # merged labels: every completely contained name is credited
    (["cat", "dog"], ["cat. dog"], ["cat", "dog"]),
    (["cat", "dog"], ["cat dog"], ["cat", "dog"]),
    (["cat", "hot dog", "zebu"], ["cat. hot dog. zebu. [SEP]"], ["cat", "hot dog", "zebu"]),
    (["bird house", "snow"], ["bird house snow"], ["bird house", "snow"]),
    # multi-word names and partial labels: the head word credits, a modifier alone does not
    (["hot dog"], ["hot dog"], ["hot dog"]),
    (["bird house"], ["house"], ["bird house"]),
    (["bird house"], ["bird"], []),
    (["tennis racket"], ["racket"], ["tennis racket"]),
    (["tennis racket"], ["tennis"], []),
    (["traffic light"], ["traffic lights"], ["traffic light"]),
    # a longer complete name wins over a shorter name inside it, and a complete short name
    # wins over a partial long one
    (["dog", "hot dog"], ["hot dog"], ["hot dog"]),
    (["dog", "hot dog"], ["dog"], ["dog"]),
    (["bird", "bird house"], ["bird house"], ["bird house"]),
    (["bird", "bird house"], ["bird"], ["bird"]),
    (["bird", "bird house"], ["bird. bird house"], ["bird", "bird house"]),
    # word pieces
    (["sandwich"], ["sand ##wich"], ["sandwich"]),
    (["zebu"], ["z ##e ##b ##u"], ["zebu"]),
    (["zebu"], ["##eb"], ["zebu"]),                     # inner piece owned by one word
    (["zebu", "cat"], ["##bu cat"], ["zebu", "cat"]),
    (["sandwich"], ["sand"], ["sandwich"]),             # leading piece owned by one word
    (["sandwich", "sandal"], ["sand"], []),             # ambiguous piece: nobody
    (["cat", "dog"], ["##s"], []),                      # ambiguous/unowned suffix
    (["zebu"], ["[UNK]"], []),
    # unrelated and empty labels
    (["cat"], ["dog"], []),
    (["cat"], [""], []),
    (["cat"], ["[SEP]"], []),
    (["cat"], ["concatenate"], []),                     # no substring matching of whole words
])
def test_robust_cases(requested, labels, expected):
    assert detected(requested, labels) == expected


def test_robust_recovers_what_strict_drops():
    requested = ["People", "game", "bird house"]
    labels = ["people.", "games", "house [SEP]", "people game"]
    strict = match_phrases(requested, labels, mode="strict")
    robust = match_phrases(requested, labels)
    assert strict == {"People": [], "game": [], "bird house": []}
    assert robust == {"People": [0, 3], "game": [1, 3], "bird house": [2]}


def test_indices_are_sorted_unique_and_every_name_present():
    out = match_phrases(["cat", "dog", "zebra"], ["dog", "cat dog", "cat", "cat. cat"])
    assert out == {"cat": [1, 2, 3], "dog": [0, 1], "zebra": []}
    assert list(out) == ["cat", "dog", "zebra"]


def test_duplicate_and_equivalent_names_share_detections():
    out = match_phrases(["cat", "Cats", "cat"], ["cats"])
    assert out == {"cat": [0], "Cats": [0]}


def test_partial_policies():
    assert detected(["bird house"], ["bird"], partial="any") == ["bird house"]
    assert detected(["bird house"], ["house"], partial="none") == []
    assert detected(["bird house"], ["bird house"], partial="none") == ["bird house"]


def test_empty_inputs():
    assert match_phrases([], ["cat"]) == {}
    assert match_phrases(["cat"], []) == {"cat": []}
    assert match_phrases(["", "cat"], ["cat"]) == {"": [], "cat": [0]}


def test_invalid_mode():
    with pytest.raises(ValueError, match="unknown match mode"):
        match_phrases(["cat"], ["cat"], mode="fuzzy")
    with pytest.raises(ValueError, match="unknown partial"):
        match_phrases(["cat"], ["cat"], partial="some")


def test_helpers():
    assert normalize_name("A Bird-House.") == ["bird", "house"]
    assert normalize_name("the") == ["the"]
    assert same_word("buses", "bus") and same_word("people", "person") and not same_word("cat", "car")
    assert label_words("a cat. hot dog ##s [SEP]") == [[("word", "cat")], [("word", "hot"), ("word", "dogs")]]
    assert label_words("##eb") == [[("suffix", "eb")]]
    assert label_words("[SEP]") == []
