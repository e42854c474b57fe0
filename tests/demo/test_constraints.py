"""Word constraints: "position:word" parsing and placement (ML-GSAI/LLaDA app.py)."""

from __future__ import annotations

import pytest

from llada.demo.constraints import parse_constraints, place_constraints


class WordTokenizer:
    """Encodes " word" as one id per character after the space, so lengths are predictable."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert text.startswith(" ") and not add_special_tokens
        return [ord(c) for c in text[1:]]


def test_parse_valid_constraints_in_order():
    assert parse_constraints("0:The, 5:king") == [(0, "The"), (5, "king")]
    assert parse_constraints(" 3 :  lord ,") == [(3, "lord")]
    assert parse_constraints("") == []
    assert parse_constraints(None) == []
    assert parse_constraints(" , ") == []


def test_word_may_contain_a_colon():
    assert parse_constraints("2:a:b") == [(2, "a:b")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("king", "is not 'position:word'"),
        ("3:", "is not 'position:word'"),
        ("x:king", "is not a whole number"),
        ("1.5:king", "is not a whole number"),
        ("-1:king", "positions start at 0"),
        ("2:a, 2:b", "given twice"),
    ],
)
def test_malformed_constraints_raise_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_constraints(text)


def test_subtokens_fill_consecutive_positions():
    fixed = place_constraints([(1, "ab"), (5, "c")], WordTokenizer(), gen_length=8)
    assert fixed == {1: ord("a"), 2: ord("b"), 5: ord("c")}


def test_word_past_the_answer_is_refused():
    place_constraints([(6, "ab")], WordTokenizer(), gen_length=8)  # positions 6, 7: fits
    with pytest.raises(ValueError, match=r"gen_length=8 positions \(0\.\.7\)"):
        place_constraints([(7, "ab")], WordTokenizer(), gen_length=8)
    with pytest.raises(ValueError, match="gen_length=8"):
        place_constraints([(8, "a")], WordTokenizer(), gen_length=8)


def test_overlapping_words_are_refused():
    with pytest.raises(ValueError, match="overlaps another word at answer position 2"):
        place_constraints([(1, "abc"), (2, "d")], WordTokenizer(), gen_length=8)


def test_real_tokenizer_encodes_with_a_leading_space(chat_checkpoint):
    from llada.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(chat_checkpoint)
    fixed = place_constraints(parse_constraints("0:question"), tokenizer, gen_length=16)
    ids = tokenizer.encode(" question", add_special_tokens=False)
    assert list(fixed) == list(range(len(ids)))
    assert list(fixed.values()) == ids
    assert tokenizer.decode(list(fixed.values())) == " question"
