"""`llada eval lm-eval` (the `llada` lm-evaluation-harness model) on LLaDA 2.x, offline.

Generation is the block sampler (`llada.block_generate`, the uncached oracle, on each prompt
alone); likelihoods are the block-diffusion ELBO of `llada.get_log_likelihood`, whose
estimator is checked here against exact log-probabilities where the bound is tight: a
one-token answer, and one answer token per block in expectation over the estimator's draws.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import llada
from conftest import go_offline
from llada.eval.lm_eval import request_seed, rolling_windows
from llada.model.llada2 import block_attention_mask
from llada.sampling.config import BlockDecodeConfig, decode_preset
from llada.tokenizer import render_chat

DATA = Path(__file__).parent / "data" / "lm_eval"
SEED = 1234
# Blocks of 8 keep the tiny model fast: max_gen_toks 5 makes gen_length 8 (one block, whose
# default steps are one per position, 8), and max_length 40 splits the longest document.
MODEL_ARGS = {
    "dtype": "float32",
    "mc_num": 4,
    "batch_size": 2,
    "is_check_greedy": False,
    "gen_length": 8,
    "block_length": 8,
    "max_length": 40,
    "rolling_stride": 16,
    "gen_batch_size": 2,
    "seed": SEED,
}
BLOCK = MODEL_ARGS["block_length"]


@pytest.fixture(scope="module")
def loaded(llada2_chat_checkpoint):
    from llada.api import load

    model, tokenizer, _ = load(llada2_chat_checkpoint, dtype="float32")
    return model, tokenizer


def seeded_elbo(model, prompt: list[int], answer: list[int], block_length: int = BLOCK) -> float:
    """What the harness must report for one request: the library's estimator after the
    request's seed."""
    torch.manual_seed(request_seed(SEED, prompt, answer))
    return llada.get_log_likelihood(
        model,
        torch.tensor(prompt),
        torch.tensor(answer),
        mc_num=4,
        batch_size=2,
        block_length=block_length,
    )


def log_prob_in_block(model, canvas: list[int], position: int, token: int) -> float:
    """log p(token at `position`) from one plain forward of `canvas` cut at the end of that
    position's block, under the samplers' block-causal mask."""
    end = (position // BLOCK + 1) * BLOCK
    window = torch.tensor([canvas[:end]])
    logits = model(window, block_attention_mask(window.shape[1], BLOCK)).logits
    return torch.log_softmax(logits[0, position].float(), -1)[token].item()


# -- the estimator ------------------------------------------------------------------------------


def test_a_one_token_answer_scores_its_exact_log_probability(loaded):
    """One answer token: every draw masks exactly it with weight 1, so the ELBO is exact: the
    log-probability of the token in its block, from the clean blocks before it."""
    model, _ = loaded
    mask = model.special_tokens.mask_id
    prompt, token = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], 60  # the answer at 11: block 1
    exact = log_prob_in_block(model, prompt + [mask], 11, token)
    for seed in (0, 1):
        torch.manual_seed(seed)
        value = llada.get_log_likelihood(
            model, torch.tensor(prompt), torch.tensor([token]), mc_num=4, batch_size=2,
            block_length=BLOCK,
        )  # fmt: skip
        assert value == pytest.approx(exact, abs=1e-5)
    # The bidirectional reading (the LLaDA-8B estimator's) gives another number: the test tells
    # the block-causal context apart.
    logits = model(torch.tensor([prompt + [mask]])).logits
    bidirectional = torch.log_softmax(logits[0, -1], -1)[token].item()
    assert abs(bidirectional - exact) > 1e-3


def test_one_answer_token_per_block_is_exact_in_expectation(loaded):
    """Answer tokens a (position 7, block 0) and b (position 8, block 1). log p(a, b | prompt)
    = log p(a | prompt) + log p(b | prompt, a) exactly (one token per block). With mc_num = 2
    the stratified draw masks n = 2 tokens in one copy (weight 1) and n = 1 in the other
    (weight 2, a or b at random), so the estimate is (la + lb) / 2 + la or (la + lb) / 2 + lb:
    both outcomes occur, and their mean is the exact value."""
    model, _ = loaded
    mask = model.special_tokens.mask_id
    prompt, a, b = [70, 71, 72, 73, 74, 75, 76], 80, 81
    la = log_prob_in_block(model, prompt + [mask, mask], 7, a)
    lb = log_prob_in_block(model, prompt + [a, mask], 8, b)
    outcomes = [(la + lb) / 2 + la, (la + lb) / 2 + lb]
    assert abs(outcomes[0] - outcomes[1]) > 1e-2  # two outcomes told apart
    hits = [0, 0]
    for seed in range(12):
        torch.manual_seed(seed)
        value = llada.get_log_likelihood(
            model, torch.tensor(prompt), torch.tensor([a, b]), mc_num=2, batch_size=2,
            block_length=BLOCK,
        )  # fmt: skip
        nearest = min((0, 1), key=lambda i: abs(value - outcomes[i]))
        assert value == pytest.approx(outcomes[nearest], abs=1e-5)
        hits[nearest] += 1
    assert hits[0] and hits[1]
    assert sum(outcomes) / 2 == pytest.approx(la + lb, abs=1e-9)  # the mean is exact


def test_the_draws_estimate_the_sum_of_the_blocks_elbos_without_bias(loaded):
    """Answer tokens at 7 (block 0) and 8, 9 (block 1). The estimator draws n uniform in 1..3,
    then n of the 3 positions, weight 3 / n; each outcome's value reads every block's term from
    that block's mask only. Enumerating the 7 outcomes (their terms from plain forwards of the
    canvas cut at the block's end), the expectation is block 0's exact log p plus block 1's own
    masked-diffusion ELBO (m uniform in 1..2, weight 2 / m), and every value the library
    returns (one draw) is one of the outcomes."""
    from itertools import combinations

    model, _ = loaded
    mask = model.special_tokens.mask_id
    prompt, answer = [70, 71, 72, 73, 74, 75, 76], [80, 81, 82]
    positions = [7, 8, 9]

    def term(masked: tuple[int, ...], position: int) -> float:
        """The block's term at `position`: its block noised as `masked` says, the blocks
        before it clean (what a noisy block sees in the training forward)."""
        block = position // BLOCK
        canvas = prompt + [
            mask if p in masked and p // BLOCK == block else t
            for p, t in zip(positions, answer, strict=True)
        ]
        return log_prob_in_block(model, canvas, position, answer[positions.index(position)])

    outcomes = {}
    for n in (1, 2, 3):
        for masked in combinations(positions, n):
            outcomes[masked] = 3 / n * sum(term(masked, p) for p in masked)
    expectation = sum(v / 3 / math.comb(3, len(s)) for s, v in outcomes.items())
    block_0 = term((7,), 7)
    block_1 = 0.5 * (2 * 0.5 * (term((8,), 8) + term((9,), 9))) + 0.5 * (
        term((8, 9), 8) + term((8, 9), 9)
    )
    assert expectation == pytest.approx(block_0 + block_1, abs=1e-9)

    hit = set()
    for seed in range(40):
        torch.manual_seed(seed)
        value = llada.get_log_likelihood(
            model, torch.tensor(prompt), torch.tensor(answer), mc_num=1, batch_size=1,
            block_length=BLOCK,
        )  # fmt: skip
        nearest = min(outcomes, key=lambda s: abs(outcomes[s] - value))
        assert value == pytest.approx(outcomes[nearest], abs=1e-5)
        hit.add(nearest)
    assert len(hit) >= 5  # most outcomes are drawn


def test_after_a_little_block_diffusion_training_the_seen_answer_scores_above_a_shuffled_one(
    llada2_chat_checkpoint,
):
    """60 steps of `block_diffusion_loss` on one sentence (blocks of 8): its true continuation
    (two blocks of answer) scores far above the same tokens shuffled."""
    import random

    from llada.api import load
    from llada.losses import block_diffusion_loss

    model, tokenizer, _ = load(llada2_chat_checkpoint, dtype="float32")
    model.train()
    model.requires_grad_(True)
    ids = tokenizer("To be, or not to be, that is the question.", add_special_tokens=False)
    ids = ids["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    batch = torch.tensor([ids] * 16)
    for _ in range(60):
        loss = block_diffusion_loss(
            model, batch, model.special_tokens.mask_id, block_length=BLOCK, generator=generator
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    prompt, answer = ids[:6], ids[6:]
    shuffled = answer[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != answer
    scores = []
    for candidate in (answer, shuffled):
        torch.manual_seed(1)
        scores.append(
            llada.get_log_likelihood(
                model,
                torch.tensor(prompt),
                torch.tensor(candidate),
                mc_num=16,
                batch_size=16,
                block_length=BLOCK,
            )  # fmt: skip
        )
    assert scores[0] > scores[1] + 5.0


def test_the_likelihood_takes_no_guidance_and_block_length_only_for_llada2(loaded, tiny_model):
    model, _ = loaded
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        llada.get_log_likelihood(model, torch.tensor([5]), torch.tensor([6]), cfg_scale=1.0)
    with pytest.raises(ValueError, match="block_length must be a positive integer"):
        llada.get_log_likelihood(model, torch.tensor([5]), torch.tensor([6]), block_length=0)
    with pytest.raises(ValueError, match="block_length is the block size of LLaDA 2.x"):
        llada.get_log_likelihood(tiny_model, torch.tensor([5]), torch.tensor([6]), block_length=8)


# -- through the harness ----------------------------------------------------------------------


def _write_tasks(folder: Path) -> Path:
    yaml = pytest.importorskip("yaml")

    def data(name: str) -> dict:
        files = {"test": str(DATA / f"{name}.jsonl")}
        return {"data_files": files, "cache_dir": str(folder / "hf-cache")}

    tasks = {
        "llada2_test_choice": {
            "dataset_kwargs": data("choice"),
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc"}],
        },
        "llada2_test_generate": {
            "dataset_kwargs": data("generate"),
            "output_type": "generate_until",
            "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 5},
            "metric_list": [{"metric": "exact_match"}],
        },
        "llada2_test_text": {
            "dataset_kwargs": data("text"),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    common = {"dataset_path": "json", "test_split": "test"}
    for name, config in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **config}))
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    pytest.importorskip("lm_eval")
    return _write_tasks(tmp_path_factory.mktemp("llada2-lm-eval-tasks"))


def _evaluate(checkpoint, task_folder, tasks, **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as monkeypatch:
        go_offline(monkeypatch)
        return lm_eval.simple_evaluate(
            model="llada",
            model_args={"pretrained": str(checkpoint), **MODEL_ARGS},
            tasks=list(tasks),
            task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
            device="cpu",
            log_samples=True,
            bootstrap_iters=0,
            **kwargs,
        )


@pytest.fixture(scope="module")
def harness(llada2_chat_checkpoint, task_folder):
    tasks = ("llada2_test_choice", "llada2_test_generate", "llada2_test_text")
    return _evaluate(llada2_chat_checkpoint, task_folder, tasks)


def block_generate_text(
    model, tokenizer, context: str, until: list[str], keep: int, cached: bool = False, **options
):
    """The oracle: `block_generate` (or, cached, `block_sample`) on the prompt alone (defaults:
    the 'llada2.0' preset with blocks of 8, 8 steps each), cut as the harness cuts (keep
    tokens, stop strings, special tokens dropped)."""
    options = {"version": "2.0", "threshold": 0.95, "steps": BLOCK, **options}
    prompt = tokenizer(context)["input_ids"]
    if cached:
        answer = llada.block_sample(
            model, [prompt], gen_length=8, block_length=BLOCK, **options
        ).answers[0]
    else:
        answer = llada.block_generate(
            model, torch.tensor([prompt]), gen_length=8, block_length=BLOCK, **options
        )[0]
    text = tokenizer.decode(answer.tolist()[:keep], skip_special_tokens=False)
    for stop in until:
        text = text.split(stop)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_generation_is_the_block_sampler_on_each_prompt(harness, loaded):
    model, tokenizer = loaded
    samples = harness["samples"]["llada2_test_generate"]
    assert len(samples) == 3  # gen_batch_size 2: one left-padded batch of two prompts
    texts = set()
    for sample_ in samples:
        ((context, gen_kwargs),) = sample_["arguments"]
        expected = block_generate_text(model, tokenizer, context, gen_kwargs["until"], 5)
        assert sample_["resps"] == [[expected]]
        texts.add(expected)
    assert len(texts) > 1 and "" not in texts  # the comparison is not between empty answers


def test_multiple_choice_scores_are_the_block_elbo(harness, loaded):
    model, tokenizer = loaded
    samples = harness["samples"]["llada2_test_choice"]
    assert len(samples) == 5
    correct = []
    for sample_ in samples:
        scores = []
        for (context, continuation), ((score, _),) in zip(
            sample_["arguments"], sample_["resps"], strict=True
        ):
            prompt = tokenizer(context)["input_ids"]
            answer = tokenizer(context + continuation)["input_ids"][len(prompt) :]
            expected = seeded_elbo(model, prompt, answer)
            # Packed with other requests, the forward's shapes differ: equal up to rounding.
            assert score == pytest.approx(expected, rel=1e-5, abs=1e-6)
            assert score != pytest.approx(seeded_elbo(model, prompt, answer, block_length=64))
            scores.append(score)
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == sample_["target"]))
    assert harness["results"]["llada2_test_choice"]["acc,none"] == sum(correct) / len(correct)


def test_perplexity_is_the_sum_of_window_block_elbos(harness, loaded):
    model, tokenizer = loaded
    total, total_bytes, most_windows = 0.0, 0, 0
    for sample_ in harness["samples"]["llada2_test_text"]:
        text = sample_["target"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = [tokenizer.bos_token_id]  # the first window's prompt (prefix_token=bos)
        windows = rolling_windows(
            ids, MODEL_ARGS["max_length"], MODEL_ARGS["rolling_stride"], prefix
        )
        most_windows = max(most_windows, len(windows))
        ((score,),) = sample_["resps"]
        assert score == pytest.approx(sum(seeded_elbo(model, c, a) for c, a in windows), rel=1e-5)
        total += score
        total_bytes += len(text.encode("utf-8"))
    assert most_windows >= 2
    bits_per_byte = harness["results"]["llada2_test_text"]["bits_per_byte,none"]
    assert bits_per_byte == pytest.approx(-total / total_bytes / math.log(2), rel=1e-9)


@pytest.fixture(scope="module")
def lm(llada2_chat_checkpoint):
    pytest.importorskip("lm_eval")
    from llada.eval.lm_eval import LLaDAEvalLM

    return LLaDAEvalLM(pretrained=str(llada2_chat_checkpoint), device="cpu", **MODEL_ARGS)


def greedy_block_by_block(model, prompt: list[int], length: int, mask_id: int) -> list[int]:
    """Block-by-block greedy decoding, each step on the canvas cut at the current block's end:
    the most confident prediction inside the first block holding a mask."""
    x = prompt + [mask_id] * length
    for _ in range(length):
        first = x.index(mask_id)
        end = (first // BLOCK + 1) * BLOCK
        window = torch.tensor([x[:end]])
        logits = model(window, block_attention_mask(window.shape[1], BLOCK)).logits[0]
        positions = [i for i in range(first, min(end, len(x))) if x[i] == mask_id]
        probabilities = torch.softmax(logits[positions].float(), -1)
        confidence, prediction = probabilities.max(-1)
        best = int(confidence.argmax())
        x[positions[best]] = int(prediction[best])
    return x[len(prompt) :]


def test_greedy_check_decodes_block_by_block(lm, loaded):
    model, tokenizer = loaded
    mask_id = model.special_tokens.mask_id
    # Answers of 6 tokens after prompts of 6 and 4 span two blocks of 8.
    prompts = [tokenizer(t)["input_ids"] for t in ("What is 2 + 3?", "To be, or")]
    greedy = [greedy_block_by_block(model, p, 6, mask_id) for p in prompts]
    wrong = [g[:-1] + [(g[-1] + 1) % 300] for g in greedy]  # the last token, in the later block
    pairs = [(p, g) for p, g in zip(prompts, greedy, strict=True)]
    pairs += [(p, w) for p, w in zip(prompts, wrong, strict=True)]
    assert lm.greedy_matches(pairs) == [True, True, False, False]


def test_default_preset_follows_the_checkpoint_name_and_model_args_override_it(
    llada2_chat_checkpoint, loaded, tmp_path
):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llada.eval.lm_eval import LLaDAEvalLM

    model, tokenizer = loaded
    lm_20 = LLaDAEvalLM(pretrained=str(llada2_chat_checkpoint), device="cpu", **MODEL_ARGS)
    assert lm_20.decode == "llada2.0"
    assert (lm_20.settings.block_length, lm_20.settings.steps) == (8, 8)
    named_21 = tmp_path / "LLaDA2.1-tiny"
    shutil.copytree(llada2_chat_checkpoint, named_21)
    lm_21 = LLaDAEvalLM(pretrained=str(named_21), device="cpu", **MODEL_ARGS)
    assert lm_21.decode == "llada2.1-quality"
    # Without block_length: the preset's (32), steps one per position.
    defaults = {k: v for k, v in MODEL_ARGS.items() if k not in ("gen_length", "block_length")}
    lm_32 = LLaDAEvalLM(pretrained=str(named_21), device="cpu", gen_length="64", **defaults)
    assert (lm_32.settings.block_length, lm_32.settings.steps) == (32, 64)

    # Model args as lm-eval passes them (strings) override the preset's values.
    # Thresholds low enough for the random model's probabilities: whole blocks commit at once
    # and decoded tokens get edited, so the answers show the override.
    overrides = {"threshold": "0.001", "editing_threshold": "0.002", "max_post_steps": "2"}
    edited = LLaDAEvalLM(pretrained=str(named_21), device="cpu", **MODEL_ARGS, **overrides)
    preset = decode_preset("llada2.1-quality")
    assert edited.decode == replace(
        preset, threshold=0.001, editing_threshold=0.002, max_post_steps=2
    )
    assert isinstance(edited.decode, BlockDecodeConfig)

    # Sampled at temperature 1 (greedy answers of the random model hardly depend on the
    # settings), one request per batch: the global generator's draws follow the requests in
    # the harness's order (longest prompt first), so the oracle runs them in that order, with
    # the same cached sampler and model object (sampled draws compare probabilities with
    # thresholds near the random model's, where rounding differences could decide).
    contexts = ["Q: What is 2 + 3?\nA:", "To be", "Q: To be, or not to be?\nA:"]
    kwargs = {"until": ["\n"], "max_gen_toks": 5}
    requests = [Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)]
    order = sorted(contexts, key=lambda c: -len(tokenizer(c)["input_ids"]))
    sampled = {**MODEL_ARGS, "temperature": 1.0, "gen_batch_size": 1}

    def answers(checkpoint, args: dict, options: dict) -> tuple[list[str], list[str]]:
        lm = LLaDAEvalLM(pretrained=str(checkpoint), device="cpu", **sampled, **args)
        torch.manual_seed(0)
        got = lm.generate_until(requests)
        torch.manual_seed(0)
        oracle = {
            c: block_generate_text(
                lm.model, tokenizer, c, ["\n"], 5, cached=True, temperature=1.0, **options
            )
            for c in order
        }
        return got, [oracle[c] for c in contexts]

    got, expected = answers(
        named_21, overrides,
        {"version": "2.1", "threshold": 0.001, "editing_threshold": 0.002, "max_post_steps": 2},
    )  # fmt: skip
    assert got == expected
    quality = {"version": "2.1", "threshold": 0.7, "editing_threshold": 0.5, "max_post_steps": 16}
    got_21, expected_21 = answers(named_21, {}, quality)
    assert got_21 == expected_21
    got_20, expected_20 = answers(llada2_chat_checkpoint, {}, {})
    assert got_20 == expected_20
    assert expected != expected_21  # the override reaches the sampler


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"cfg": "0.5", "remasking": "random"}, "cfg=0.5, remasking='random': LLaDA-8B sampler"),
        ({"logits_eos_inf": "true"}, "logits_eos_inf=True: LLaDA-8B sampler"),
        ({"preset": "reference"}, "preset=reference is a LLaDA-8B / LLaDA-MoE preset"),
        ({"threshold": "high"}, "threshold must be a number, got 'high'"),
        ({"top_p": "1.5"}, "top_p must be None or in"),
        ({"max_post_steps": "-1"}, "max_post_steps must be a non-negative integer"),
        ({"eos_early_stop": "maybe"}, "eos_early_stop must be true or false"),
        ({"preset": "llada2.9"}, "unknown preset 'llada2.9'"),
    ],
)
def test_wrong_model_args_are_one_clear_error(llada2_chat_checkpoint, args, message):
    pytest.importorskip("lm_eval")
    from llada.eval.lm_eval import LLaDAEvalLM

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LLaDAEvalLM(pretrained=str(llada2_chat_checkpoint), device="cpu", **MODEL_ARGS, **args)


def test_llada2_args_on_another_family_are_one_clear_error(chat_checkpoint):
    pytest.importorskip("lm_eval")
    from llada.eval.lm_eval import LLaDAEvalLM

    base = {"dtype": "float32", "gen_length": 8, "block_length": 8, "steps": 8}
    with pytest.raises(ValueError, match="threshold, top_k: LLaDA 2.x block-sampler model args"):
        LLaDAEvalLM(pretrained=str(chat_checkpoint), device="cpu", threshold=0.5, top_k=3, **base)
    with pytest.raises(ValueError, match="preset=llada2.0 is a LLaDA 2.x preset"):
        LLaDAEvalLM(pretrained=str(chat_checkpoint), device="cpu", preset="llada2.0", **base)
    reference = LLaDAEvalLM(pretrained=str(chat_checkpoint), device="cpu", **base)
    assert reference.decode == "reference"


def test_chat_template_is_the_role_template_and_chat_answers_are_tokenized_alone(
    llada2_chat_checkpoint, task_folder, loaded, lm
):
    _, tokenizer = loaded
    results = _evaluate(
        llada2_chat_checkpoint, task_folder, ["llada2_test_generate"],
        limit=1, apply_chat_template=True,
    )  # fmt: skip
    (sample_,) = results["samples"]["llada2_test_generate"]
    ((context, _),) = sample_["arguments"]
    expected = render_chat(tokenizer, [{"role": "user", "content": "Q: What is 2 + 3?\nA:"}])
    assert context == expected
    assert context.endswith("<role>ASSISTANT</role>")
    # A rendered chat's answer is scored as tokenized on its own (pair_split=auto).
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    assert lm._encode_pair(context, "5") == (
        ids,
        tokenizer("5", add_special_tokens=False)["input_ids"],
    )


def test_cli_reports_what_the_harness_reports(
    llada2_chat_checkpoint, task_folder, harness, tmp_path, capsys, monkeypatch
):
    import json

    from llada.cli.main import main

    go_offline(monkeypatch)
    tasks = ("llada2_test_choice", "llada2_test_generate", "llada2_test_text")
    args = ",".join(f"{k}={v}" for k, v in MODEL_ARGS.items() if k != "seed")
    code = main(
        [
            "eval", "lm-eval", "--tasks", ",".join(tasks), "--include-path", str(task_folder),
            "--model", str(llada2_chat_checkpoint), "--model-args", args, "--device", "cpu",
            "--seed", str(SEED), "--bootstrap-iters", "0", "--output-path", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert code == 0
    (written,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(written.read_text())["results"]
    table = capsys.readouterr().out
    for task in tasks:
        assert task in table
        for metric, value in harness["results"][task].items():
            if isinstance(value, float):
                assert results[task][metric] == pytest.approx(value, rel=1e-9), (task, metric)
