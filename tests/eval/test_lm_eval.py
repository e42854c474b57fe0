"""The `llada` lm-evaluation-harness model, end to end on local JSONL tasks, offline.

The harness runs three small tasks (multiple choice, generation, perplexity) on a tiny random
checkpoint; every figure it reports is recomputed here from the library's own functions
(`get_log_likelihood`, `sample`), and a two-process run must report the same metrics.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
yaml = pytest.importorskip("yaml")

from conftest import OFFLINE, go_offline  # noqa: E402
from llada.eval.lm_eval import (  # noqa: E402
    HarnessSettings,
    LLaDAEvalLM,
    answer_generation,
    cut_at_stops,
    request_seed,
    rolling_windows,
)
from llada.likelihood import get_log_likelihood  # noqa: E402
from llada.sampling.config import GenerateConfig  # noqa: E402
from llada.sampling.fast import sample  # noqa: E402
from llada.tokenizer import render_chat  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
SEED = 1234
# Small enough for one CPU thread; max_length 32 splits the longest document into 3 windows,
# and max_gen_toks 5 with blocks of 4 makes gen_length 8 (2 blocks of 2 steps).
MODEL_ARGS = {
    "dtype": "float32",
    "mc_num": 8,
    "batch_size": 4,
    "is_check_greedy": False,
    "steps": 2,
    "gen_length": 4,
    "block_length": 4,
    "max_length": 32,
    "rolling_stride": 8,
    "gen_batch_size": 2,
    "seed": SEED,
}
TASKS = ("llada_test_choice", "llada_test_generate", "llada_test_text")


def task_configs(cache_dir: Path) -> dict[str, dict]:
    def data(name: str) -> dict:
        return {"data_files": {"test": str(DATA / f"{name}.jsonl")}, "cache_dir": str(cache_dir)}

    common = {"dataset_path": "json", "test_split": "test"}
    return {
        "llada_test_choice": {
            **common,
            "dataset_kwargs": data("choice"),
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        "llada_test_generate": {
            **common,
            "dataset_kwargs": data("generate"),
            "output_type": "generate_until",
            "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 5},
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
            ],
        },
        "llada_test_text": {
            **common,
            "dataset_kwargs": data("text"),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity"},
                {"metric": "byte_perplexity"},
                {"metric": "bits_per_byte"},
            ],
        },
    }


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, config in task_configs(folder / "hf-cache").items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **config}))
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(scope="module")
def harness(chat_checkpoint, task_folder):
    """One in-process harness run of the three tasks, shared by the tests below."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as monkeypatch:
        go_offline(monkeypatch)
        results = lm_eval.simple_evaluate(
            model="llada",
            model_args={"pretrained": str(chat_checkpoint), **MODEL_ARGS},
            tasks=list(TASKS),
            task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
            device="cpu",
            log_samples=True,
            bootstrap_iters=0,
        )
    return results


@pytest.fixture(scope="module")
def model_and_tokenizer(chat_checkpoint):
    from llada.api import load

    model, tokenizer, _ = load(chat_checkpoint, dtype="float32")
    return model, tokenizer


def reference_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """eval_llada.py's _encode_pair (ML-GSAI/LLaDA)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    prompt = tokenizer(context)["input_ids"]
    return prompt, whole[len(prompt) :]


def seeded_log_likelihood(model, prompt, answer, **kwargs) -> float:
    torch.manual_seed(request_seed(SEED, prompt, answer))
    return get_log_likelihood(
        model, torch.tensor(prompt), torch.tensor(answer), mc_num=8, batch_size=4, **kwargs
    )


def test_multiple_choice_scores_are_get_log_likelihood(harness, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    samples = harness["samples"]["llada_test_choice"]
    assert len(samples) == 5
    correct = []
    for sample_ in samples:
        scores = []
        for (context, continuation), response in zip(
            sample_["arguments"], sample_["resps"], strict=True
        ):
            expected = seeded_log_likelihood(
                model, *reference_split(tokenizer, context, continuation)
            )
            ((score, _greedy),) = response
            # Packed with other requests, the forward's shapes differ: equal up to rounding.
            assert score == pytest.approx(expected, rel=1e-5, abs=1e-6)
            scores.append(score)
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == sample_["target"]))
    assert harness["results"]["llada_test_choice"]["acc,none"] == sum(correct) / len(correct)


def test_generation_is_the_sampler_cut_at_the_stop_strings(harness, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    samples = harness["samples"]["llada_test_generate"]
    assert len(samples) == 3
    # max_gen_toks 5 with blocks of 4: two blocks (8 tokens, 2 steps each), cut to 5 tokens.
    config = GenerateConfig(steps=4, gen_length=8, block_length=4)
    matches = []
    for sample_ in samples:
        ((context, gen_kwargs),) = sample_["arguments"]
        prompt = tokenizer(context)["input_ids"]
        out = sample(model, torch.tensor([prompt]), None, config, "reference").tokens
        text = tokenizer.decode(out[0, len(prompt) : len(prompt) + 5], skip_special_tokens=False)
        for stop in gen_kwargs["until"]:
            text = text.split(stop)[0]
        text = tokenizer.decode(
            tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        assert sample_["resps"] == [[text]]
        matches.append(float(text == sample_["target"]))
    assert harness["results"]["llada_test_generate"]["exact_match,none"] == sum(matches) / 3


def test_perplexity_is_the_sum_of_window_elbos(harness, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    samples = harness["samples"]["llada_test_text"]
    total_loglik, total_bytes, windows_seen = 0.0, 0, 0
    for sample_ in samples:
        text = sample_["target"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows = rolling_windows(ids, 32, 8, [tokenizer.bos_token_id])
        windows_seen = max(windows_seen, len(windows))
        expected = sum(seeded_log_likelihood(model, c, a) for c, a in windows)
        ((score,),) = sample_["resps"]
        assert score == pytest.approx(expected, rel=1e-5)
        total_loglik += score
        total_bytes += len(text.encode("utf-8"))
    assert windows_seen == 3  # the longest document needs three windows
    bits_per_byte = harness["results"]["llada_test_text"]["bits_per_byte,none"]
    assert bits_per_byte == pytest.approx(-total_loglik / total_bytes / math.log(2), rel=1e-9)


def test_rolling_windows_score_every_token_once_with_the_preceding_context():
    tokens = list(range(100, 137))
    for max_length, stride, prefix in ((24, 8, [1]), (10, 10, []), (7, 3, [1]), (50, 25, [1])):
        windows = rolling_windows(tokens, max_length, stride, prefix)
        assert [t for _, answer in windows for t in answer] == tokens
        full = prefix + tokens
        position = len(prefix)
        for context, answer in windows:
            assert 0 < len(context) + len(answer) <= max_length
            assert context == full[position - len(context) : position]
            position += len(answer)
        assert windows[0][0] == prefix
        # Windows after the first are filled with context up to max_length.
        assert all(len(c) + len(a) == max_length for c, a in windows[1:])
    assert rolling_windows([], 8, 4, [1]) == []
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(tokens, 8, 9)


@pytest.fixture(scope="module")
def lm(chat_checkpoint):
    return LLaDAEvalLM(pretrained=str(chat_checkpoint), device="cpu", **MODEL_ARGS)


def test_packing_requests_into_forwards_changes_no_score(chat_checkpoint, lm, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    question = tokenizer("What is 2 + 3? The answer is")["input_ids"]
    pairs = [(question, [40]), (question, [41]), (question, [41, 42]), (question[1:], [41, 42])]
    pairs.append(reference_split(tokenizer, "To be, or not to be", ", that is the question"))
    together = lm.elbo_scores(pairs)
    alone = [lm.elbo_scores([pair])[0] for pair in pairs]
    expected = [seeded_log_likelihood(model, p, a) for p, a in pairs]
    assert together == alone == expected
    one_row = LLaDAEvalLM(
        pretrained=str(chat_checkpoint), device="cpu", **{**MODEL_ARGS, "token_budget": 1}
    )
    assert one_row.elbo_scores(pairs) == expected
    assert len(set(expected)) == len(expected)


def test_guided_scores_are_get_log_likelihood_with_cfg(chat_checkpoint, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    guided = LLaDAEvalLM(pretrained=str(chat_checkpoint), device="cpu", **MODEL_ARGS, cfg=0.5)
    pairs = [
        reference_split(tokenizer, "What is 2 + 3?", " 5"),
        reference_split(tokenizer, "What is 2 + 3?", " 4"),
    ]
    expected = [seeded_log_likelihood(model, p, a, cfg_scale=0.5) for p, a in pairs]
    assert guided.elbo_scores(pairs) == expected
    assert expected != [seeded_log_likelihood(model, p, a) for p, a in pairs]


def greedy_one_at_a_time(model, prompt: list[int], length: int, mask_id: int) -> list[int]:
    """eval_llada.py's suffix_greedy_prediction (ML-GSAI/LLaDA), one request: unmask the most
    confident prediction."""
    x = torch.tensor([prompt + [mask_id] * length])
    for _ in range(length):
        is_masked = x == mask_id
        logits = model(x).logits[is_masked]
        prediction = logits.argmax(-1)
        confidence = torch.softmax(logits.float(), -1).gather(-1, prediction[:, None])[:, 0]
        best = int(confidence.argmax())
        x[0, torch.nonzero(is_masked[0])[best, 0]] = prediction[best]
    return x[0, len(prompt) :].tolist()


def test_greedy_check_is_one_token_at_a_time_decoding(lm, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    mask_id = model.special_tokens.mask_id
    prompts = [tokenizer(t)["input_ids"] for t in ("What is 2 + 3?", "To be, or not to be")]
    greedy = [greedy_one_at_a_time(model, p, 3, mask_id) for p in prompts]
    wrong = [[t if i else (t + 1) % 300 for i, t in enumerate(g)] for g in greedy]
    pairs = [(p, g) for p, g in zip(prompts, greedy, strict=True)]
    pairs += [(p, w) for p, w in zip(prompts, wrong, strict=True)]
    shorter = greedy_one_at_a_time(model, prompts[0], 2, mask_id)
    pairs += [(prompts[0], shorter), (prompts[1], shorter)]
    expected = [True, True, False, False, True]
    expected.append(greedy_one_at_a_time(model, prompts[1], 2, mask_id) == shorter)
    assert lm.greedy_matches(pairs) == expected


def test_loglikelihood_reports_the_greedy_check_when_asked(chat_checkpoint, model_and_tokenizer):
    from lm_eval.api.instance import Instance

    model, tokenizer = model_and_tokenizer
    checking = LLaDAEvalLM(
        pretrained=str(chat_checkpoint), device="cpu", **{**MODEL_ARGS, "is_check_greedy": True}
    )
    mask_id = model.special_tokens.mask_id
    context = "What is 2 + 3?"
    prompt = tokenizer(context)["input_ids"]
    continuations = [tokenizer.decode(greedy_one_at_a_time(model, prompt, 2, mask_id)), " 5"]
    requests = [Instance("loglikelihood", {}, (context, c), i) for i, c in enumerate(continuations)]
    results = checking.loglikelihood(requests)
    expected = []
    for continuation in continuations:
        prompt, answer = reference_split(tokenizer, context, continuation)
        is_greedy = greedy_one_at_a_time(model, prompt, len(answer), mask_id) == answer
        expected.append((seeded_log_likelihood(model, prompt, answer), is_greedy))
    assert results == expected
    assert [g for _, g in expected] == [True, False]  # the decoded greedy answer re-encodes


def test_generation_settings_follow_max_gen_toks_and_stop_strings():
    config = GenerateConfig(steps=64, gen_length=128, block_length=32)
    assert answer_generation(config, None) == (config, 128)
    longer, keep = answer_generation(config, 100)  # 4 blocks of 32, 16 steps each
    assert (longer.gen_length, longer.block_length, longer.steps, keep) == (128, 32, 64, 100)
    shorter, keep = answer_generation(config, 33)
    assert (shorter.gen_length, shorter.steps, keep) == (64, 32, 33)
    with pytest.raises(ValueError, match="max_gen_toks"):
        answer_generation(config, 0)
    assert cut_at_stops("6 * 7 = 42\nQ: next", ["\n", "Q:"]) == "6 * 7 = 42"
    assert cut_at_stops("no stop here", ["\n\n", ""]) == "no stop here"


def test_answers_are_cut_at_stops_and_lose_special_tokens(lm, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    answer = tokenizer("The answer is 5.", add_special_tokens=False)["input_ids"]
    assert lm._answer_text(answer + [eot, eos, eos], []) == "The answer is 5."
    follow = tokenizer("\nQ: What is 2 + 3?", add_special_tokens=False)["input_ids"]
    assert lm._answer_text(answer + follow + [eos], ["Q:"]) == "The answer is 5.\n"
    assert lm._answer_text(answer + follow + [eos], ["\n", "Q:"]) == "The answer is 5."


def test_generation_batches_agree_with_single_requests(chat_checkpoint, lm):
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["\n"], "max_gen_toks": 5}
    contexts = ["Q: What is 2 + 3?\nA:", "To be", "Q: To be, or not to be?\nA:"]
    requests = [Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)]
    batched = lm.generate_until(requests)
    single = LLaDAEvalLM(
        pretrained=str(chat_checkpoint), device="cpu", **{**MODEL_ARGS, "gen_batch_size": 1}
    )
    assert batched == single.generate_until(requests)
    fast = LLaDAEvalLM(
        pretrained=str(chat_checkpoint), device="cpu", **{**MODEL_ARGS, "preset": "fast"}
    )
    model, tokenizer = fast.model, fast.tokenizer
    expected = []
    for context in contexts:
        prompt = tokenizer(context)["input_ids"]
        config = GenerateConfig(steps=4, gen_length=8, block_length=4)
        out = sample(model, torch.tensor([prompt]), None, config, "fast").tokens[0]
        text = tokenizer.decode(out[len(prompt) : len(prompt) + 5], skip_special_tokens=False)
        text = text.split("\n")[0]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected.append(tokenizer.decode(ids, skip_special_tokens=True))
    assert fast.generate_until(requests) == expected


def test_chat_template_is_the_checkpoints(lm, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = lm.apply_chat_template(messages)
    assert rendered == render_chat(tokenizer, messages)
    assert rendered.startswith(tokenizer.bos_token)
    ids = lm._encode(rendered)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert lm.tokenizer_name and "/" not in lm.tokenizer_name
    assert lm.chat_template(True) == tokenizer.chat_template


def test_chat_rendered_contexts_score_the_answer_tokenized_on_its_own(
    chat_checkpoint, lm, model_and_tokenizer
):
    _, tokenizer = model_and_tokenizer
    context = render_chat(tokenizer, [{"role": "user", "content": "Repeat exactly:\nking sun"}])
    answer = "king sun"
    separate = (
        tokenizer(context, add_special_tokens=False)["input_ids"],
        tokenizer(answer, add_special_tokens=False)["input_ids"],
    )
    # The reference's split scores the template's trailing "\n\n" as part of the answer, and
    # tokenizes it together with the answer.
    reference = reference_split(tokenizer, context, answer)
    assert reference != separate
    assert lm._encode_pair(context, answer) == separate  # pair_split="auto"
    plain = ("Question: What is 2 + 3?\nAnswer: ", "5")
    assert lm._encode_pair(*plain) == reference_split(tokenizer, *plain)
    as_reference = LLaDAEvalLM(
        pretrained=str(chat_checkpoint), device="cpu", **{**MODEL_ARGS, "pair_split": "reference"}
    )
    assert as_reference._encode_pair(context, answer) == reference
    with pytest.raises(ValueError, match="pair_split must be one of"):
        LLaDAEvalLM(
            pretrained=str(chat_checkpoint), device="cpu", **{**MODEL_ARGS, "pair_split": "x"}
        )


def test_harness_applies_the_chat_template(chat_checkpoint, task_folder, model_and_tokenizer):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, tokenizer = model_and_tokenizer
    with pytest.MonkeyPatch.context() as monkeypatch:
        go_offline(monkeypatch)
        results = lm_eval.simple_evaluate(
            model="llada",
            model_args={"pretrained": str(chat_checkpoint), **MODEL_ARGS},
            tasks=["llada_test_generate"],
            task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
            device="cpu",
            limit=1,
            apply_chat_template=True,
            log_samples=True,
            bootstrap_iters=0,
        )
    (sample_,) = results["samples"]["llada_test_generate"]
    ((context, _),) = sample_["arguments"]
    document = json.loads((DATA / "generate.jsonl").read_text().splitlines()[0])
    expected = render_chat(
        tokenizer, [{"role": "user", "content": f"Q: {document['question']}\nA:"}]
    )
    assert context == expected


def test_long_prompts_lose_their_start(lm):
    answer = list(range(10, 20))
    assert lm._fit(list(range(100, 150)), answer) == list(range(128, 150))  # 22 + 10 = 32
    assert lm._fit([1, 2], answer) == [1, 2]
    with pytest.raises(ValueError, match="max_length"):
        lm._fit([1], list(range(33)))


def test_settings_are_validated_with_clear_messages(chat_checkpoint):
    parsed = HarnessSettings.from_model_args(
        {"mc_num": "16", "cfg": "0.5", "is_check_greedy": "false", "temperature": "None"}
    )
    assert (parsed.mc_num, parsed.cfg, parsed.is_check_greedy, parsed.temperature) == (
        16,
        0.5,
        False,
        None,
    )
    with pytest.raises(ValueError, match="multiple of batch_size"):
        HarnessSettings(mc_num=12, batch_size=8)
    with pytest.raises(ValueError, match="block_length"):
        HarnessSettings(gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="preset"):
        HarnessSettings(preset="warp")
    with pytest.raises(TypeError, match="mc_nums"):
        LLaDAEvalLM(pretrained=str(chat_checkpoint), device="cpu", mc_nums=4)


def test_cli_runs_local_tasks_and_writes_results(
    chat_checkpoint, task_folder, harness, tmp_path, capsys, monkeypatch
):
    from llada.cli.main import main

    go_offline(monkeypatch)
    args = ",".join(f"{k}={v}" for k, v in MODEL_ARGS.items() if k != "seed")
    code = main(
        [
            "eval",
            "lm-eval",
            "--tasks",
            ",".join(TASKS),
            "--include-path",
            str(task_folder),
            "--model",
            str(chat_checkpoint),
            "--model-args",
            args,
            "--device",
            "cpu",
            "--seed",
            str(SEED),
            "--bootstrap-iters",
            "0",
            "--output-path",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    for task in TASKS:
        assert task in table
    (written,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(written.read_text())["results"]
    for task in TASKS:
        for metric, value in harness["results"][task].items():
            if isinstance(value, float):
                assert results[task][metric] == pytest.approx(value, rel=1e-9), (task, metric)


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import lm_eval
    from lm_eval.tasks import TaskManager
    from llada.eval.lm_eval import LLaDAEvalLM

    checkpoint, tasks_folder, out, model_args = sys.argv[1:5]
    lm = LLaDAEvalLM(pretrained=checkpoint, device="cpu", **json.loads(model_args))
    rank = lm.rank
    assert lm.world_size == 2, lm.world_size
    # The lm-eval >= 0.4.12 primitives ...
    assert lm.all_gather(torch.tensor(rank)).tolist() == [0, 1]
    gathered = lm.gather_object({"rank": rank})
    assert gathered == ([{"rank": 0}, {"rank": 1}] if rank == 0 else None), gathered
    lm.barrier()
    # ... and what lm-eval <= 0.4.11 calls on lm.accelerator.
    assert lm.accelerator.gather(torch.tensor(rank + 1)).tolist() == [1, 2]
    lm.accelerator.wait_for_everyone()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=TASK_NAMES,
        task_manager=TaskManager(include_path=tasks_folder, include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results["results"], f)
    else:
        assert results is None
    torch.distributed.destroy_process_group()
    """
).replace("TASK_NAMES", repr(list(TASKS)))


@pytest.mark.slow
def test_two_processes_report_the_same_metrics(chat_checkpoint, task_folder, harness, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "results.json"
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(chat_checkpoint),
        str(task_folder),
        str(out),
        json.dumps(MODEL_ARGS),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    for task in TASKS:
        for metric, value in harness["results"][task].items():
            if isinstance(value, float):
                assert results[task][metric] == pytest.approx(value, rel=1e-9), (task, metric)
