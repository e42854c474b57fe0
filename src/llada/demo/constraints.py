"""Word constraints of the demo: "position:word" text -> fixed answer tokens (ML-GSAI/LLaDA app.py).

The reference app.py accepts "pos:word, pos:word" and silently drops what it cannot use. Here a
malformed item, a repeated position or a word that does not fit the answer is an error that says
what to change, so a typo never goes unnoticed.
"""

from __future__ import annotations

from typing import Any

EXAMPLE = "0:The, 5:king"


def parse_constraints(text: str | None) -> list[tuple[int, str]]:
    """ "0:The, 5:king" -> [(0, "The"), (5, "king")], in the order given.

    Positions are answer offsets (0 is the first generated token). Empty text, or empty items
    between commas, mean no constraint.
    """
    constraints: list[tuple[int, str]] = []
    seen: set[int] = set()
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        position_text, colon, word = item.partition(":")
        word = word.strip()
        if not colon or not word:
            raise ValueError(f"constraint {item!r} is not 'position:word'; write e.g. {EXAMPLE!r}")
        try:
            position = int(position_text.strip())
        except ValueError:
            raise ValueError(
                f"constraint {item!r}: the position {position_text.strip()!r} is not a whole "
                f"number; write e.g. {EXAMPLE!r}"
            ) from None
        if position < 0:
            raise ValueError(f"constraint {item!r}: positions start at 0, got {position}")
        if position in seen:
            raise ValueError(f"constraint {item!r}: position {position} is given twice")
        seen.add(position)
        constraints.append((position, word))
    return constraints


def place_constraints(
    constraints: list[tuple[int, str]], tokenizer: Any, gen_length: int
) -> dict[int, int]:
    """{answer offset: token id} for parsed constraints.

    As in the reference app, each word is encoded as `tokenizer.encode(" " + word)` without
    special tokens, and its subtokens fill offsets pos, pos+1, ... A word that runs past the
    answer, or overlaps another word's subtokens, is an error.
    """
    fixed: dict[int, int] = {}
    for position, word in constraints:
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"constraint {position}:{word}: the word encodes to no tokens")
        end = position + len(ids)
        if end > gen_length:
            raise ValueError(
                f"constraint {position}:{word} needs answer positions {position}..{end - 1} "
                f"({len(ids)} token{'s' if len(ids) > 1 else ''}), but the answer has "
                f"gen_length={gen_length} positions (0..{gen_length - 1}); use a smaller "
                "position or a larger gen_length"
            )
        for offset, token in enumerate(ids, start=position):
            if offset in fixed:
                raise ValueError(
                    f"constraint {position}:{word} overlaps another word at answer position "
                    f"{offset} (a word may span several tokens); move one of them"
                )
            fixed[offset] = token
    return fixed
