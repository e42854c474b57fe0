"""The reference sampler beyond the vectors: batching, argument checks, the EOS options."""

from __future__ import annotations

import pytest
import torch

import llada
from conftest import make_random_model
from llada.sampling.reference import get_num_transfer_tokens
from llada.tokens import SpecialTokens


class TableModel(torch.nn.Module):
    """A mock mask predictor whose logits depend only on the position: logits[l] = table[l]."""

    def __init__(self, table: torch.Tensor, tokens: SpecialTokens) -> None:
        super().__init__()
        self.table = table  # (L, V)
        self.special_tokens = tokens
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x, attention_mask=None):
        self.calls += 1
        return type(
            "Out", (), {"logits": self.table[: x.shape[1]].expand(x.shape[0], -1, -1).clone()}
        )()


def test_schedule_is_linear():
    counts = get_num_transfer_tokens(torch.ones(2, 10, dtype=torch.bool), 4)
    assert counts.tolist() == [[3, 3, 2, 2], [3, 3, 2, 2]]
    assert int(get_num_transfer_tokens(torch.tensor([[True, False, True]]), 3).sum()) == 2


def test_batch_rows_equal_single_rows_under_left_padding():
    model = make_random_model(seed=3)
    prompts = [[5, 9, 11, 2, 7, 8, 1], [4, 6, 3]]
    pad = model.special_tokens.pad_id
    ids = torch.tensor([prompts[0], [pad] * 4 + prompts[1]])
    attention_mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    kwargs = dict(steps=8, gen_length=8, block_length=4)
    batched = llada.generate(model, ids, attention_mask=attention_mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = llada.generate(model, torch.tensor([prompt]), **kwargs)
        assert batched[row, -8:].tolist() == alone[0, -8:].tolist()


def test_logits_under_left_padding_equal_unpadded(random_model):
    ids = torch.tensor([[7, 3, 9, 1, 2]])
    padded = torch.tensor([[60, 60, 7, 3, 9, 1, 2]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    plain = random_model(ids).logits
    with_padding = random_model(padded, attention_mask=attention_mask).logits[:, 2:]
    torch.testing.assert_close(with_padding, plain, atol=1e-5, rtol=1e-5)


def test_cfg_without_attention_mask_works(random_model):
    # The reference crashes here (UnboundLocalError); an all-ones mask is dropped by the model,
    # so the answer must equal the one with a mask.
    prompt = torch.tensor([[5, 9, 11, 2]])
    kwargs = dict(steps=4, gen_length=4, block_length=4, cfg_scale=1.0)
    without = llada.generate(random_model, prompt, **kwargs)
    with_mask = llada.generate(
        random_model, prompt, attention_mask=torch.ones_like(prompt), **kwargs
    )
    assert without.tolist() == with_mask.tolist()


def test_logits_eos_inf_forbids_eos():
    tokens = SpecialTokens(mask_id=9, eos_id=7, pad_id=7, eot_id=8)
    table = torch.zeros(12, 10)
    table[:, 7] = 5.0  # EOS is everyone's favourite
    model = TableModel(table, tokens)
    out = llada.generate(model, torch.tensor([[1, 2]]), steps=4, gen_length=4, block_length=4)
    assert out[0, 2:].tolist() == [7, 7, 7, 7]
    out = llada.generate(
        model, torch.tensor([[1, 2]]), steps=4, gen_length=4, block_length=4, logits_eos_inf=True
    )
    assert 7 not in out[0, 2:].tolist()


def _eos_table() -> tuple[torch.Tensor, SpecialTokens]:
    """Positions 2-3 propose EOS very confidently, positions 4-5 propose token 3 less so."""
    tokens = SpecialTokens(mask_id=9, eos_id=7, pad_id=7, eot_id=8)
    table = torch.zeros(6, 10)
    table[2:4, 7] = 10.0
    table[4:6, 3] = 2.0
    return table, tokens


def test_confidence_eos_eot_inf_reference_and_fixed():
    table, tokens = _eos_table()

    class Recorder(TableModel):
        def forward(self, x, attention_mask=None):
            self.states.append(x[0].tolist())
            return super().forward(x, attention_mask)

    def first_commits(**kwargs) -> list[int]:
        model = Recorder(table, tokens)
        model.states = []
        final = llada.generate(
            model, torch.tensor([[1, 2]]), steps=4, gen_length=4, block_length=4, **kwargs
        )
        states = model.states[1:] + [final[0].tolist()]
        before = model.states[0]
        order = []
        for state in states:
            changed = [i for i in range(len(state)) if state[i] != before[i]]
            order += changed
            before = state
        return order

    # Positions committed in the first two steps (sorted: ties within a step are unordered).
    # Without the flag, the confident EOS positions go first.
    assert sorted(first_commits()[:2]) == [2, 3]
    # The reference flag at temperature 0 defers them (their confidence becomes 0).
    assert sorted(first_commits(confidence_eos_eot_inf=True)[:2]) == [4, 5]
    # The fixed flag defers them too, with any remasking.
    assert sorted(first_commits(confidence_eos_eot_inf=True, fix_confidence_eos_eot=True)[:2]) == [
        4,
        5,
    ]
    torch.manual_seed(0)
    assert sorted(
        first_commits(confidence_eos_eot_inf=True, fix_confidence_eos_eot=True, remasking="random")[
            :2
        ]
    ) == [4, 5]
    # At temperature > 0 the reference flag leaves EOS proposals un-deferred (its bug) ...
    torch.manual_seed(0)
    assert sorted(first_commits(confidence_eos_eot_inf=True, temperature=0.1)[:2]) == [2, 3]
    # ... and the fixed flag defers them.
    torch.manual_seed(0)
    assert sorted(
        first_commits(confidence_eos_eot_inf=True, fix_confidence_eos_eot=True, temperature=0.1)[:2]
    ) == [4, 5]


def test_steps_are_spent_per_block():
    table, tokens = _eos_table()
    table = torch.zeros(10, 10)
    model = TableModel(table, tokens)
    llada.generate(model, torch.tensor([[1, 2]]), steps=8, gen_length=8, block_length=2)
    assert model.calls == 8
    model.calls = 0
    llada.generate(
        model, torch.tensor([[1, 2]]), steps=8, gen_length=8, block_length=2, cfg_scale=0.5
    )
    assert model.calls == 8  # guidance batches both passes into one call


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"gen_length": 10, "block_length": 4}, ValueError, "multiple of block_length"),
        (
            {"steps": 3, "gen_length": 8, "block_length": 4},
            ValueError,
            "multiple of the number of blocks",
        ),
        ({"steps": 0}, ValueError, "steps must be a positive integer"),
        ({"gen_length": -8}, ValueError, "gen_length must be a positive integer"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"cfg_scale": -0.5}, ValueError, "cfg_scale"),
        ({"remasking": "high_confidence"}, ValueError, "remasking"),
        ({"mask_id": -1}, ValueError, "mask_id"),
        ({"attention_mask": torch.ones(1, 3)}, ValueError, "attention_mask"),
        ({"attention_mask": torch.full((1, 4), 2)}, ValueError, "only 1"),
    ],
)
def test_bad_arguments_are_explained(random_model, kwargs, error, words):
    arguments = {"steps": 8, "gen_length": 8, "block_length": 8, **kwargs}
    with pytest.raises(error, match=words):
        llada.generate(random_model, torch.tensor([[1, 2, 3, 4]]), **arguments)


@pytest.mark.parametrize(
    ("prompt", "error", "words"),
    [
        ([[1, 2, 3]], TypeError, "LongTensor"),
        (torch.tensor([1, 2, 3]), ValueError, "unsqueeze"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer"),
        (torch.tensor([[1, 2, 999]]), ValueError, "vocabulary"),
    ],
)
def test_bad_prompts_are_explained(random_model, prompt, error, words):
    with pytest.raises(error, match=words):
        llada.generate(random_model, prompt, steps=4, gen_length=4, block_length=4)
