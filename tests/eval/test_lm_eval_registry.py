"""The `llada` model from lm-evaluation-harness's own entry points: its command line
(`python -m llada.eval`, lm-eval's CLI with the model registered), `simple_evaluate`, the
`lm_eval.models` entry point, lm-eval's built-in models beside it, and lm-eval's --batch_size
as requests per batch (the model arg batch_size stays the Monte Carlo mini-batch)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("yaml")

from test_lm_eval import (  # noqa: E402
    MODEL_ARGS,
    TASKS,
    reference_split,
    seeded_log_likelihood,
    write_tasks,
)

from conftest import OFFLINE, go_offline  # noqa: E402
from llada.eval import lm_eval as llada_lm_eval  # noqa: E402
from llada.eval.lm_eval import LLaDAEvalLM, parse_request_batch_size  # noqa: E402


def run_python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("registry-tasks"))


def test_registering_llada_first_keeps_lm_evals_built_in_models(task_folder):
    # A fresh process, llada imported before anything of lm-eval's models: the order in which
    # lm-eval's lazy registry used to end up holding `llada` alone.
    done = run_python(
        """
        import sys
        import llada.eval.lm_eval
        import lm_eval
        from lm_eval.api.registry import get_model
        from lm_eval.tasks import TaskManager

        assert get_model("llada").__name__ == "LLaDAEvalLM"
        assert get_model("dummy").__name__ == "DummyLM"
        assert get_model("hf").__name__ == "HFLM"
        results = lm_eval.simple_evaluate(
            model="dummy",
            tasks=["llada_test_choice"],
            task_manager=TaskManager(include_path=sys.argv[1], include_defaults=False),
            bootstrap_iters=0,
        )
        print("ACC", results["results"]["llada_test_choice"]["acc,none"])
        """,
        str(task_folder),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("ACC ")]
    assert 0.0 <= float(line.split()[1]) <= 1.0


def test_entry_point_names_the_model_and_loads_through_lm_evals_registry():
    (entry,) = [
        e for e in importlib.metadata.entry_points(group="lm_eval.models") if e.name == "llada"
    ]
    assert entry.value == llada_lm_eval.MODEL_TARGET == "llada.eval.lm_eval:LLaDAEvalLM"
    assert entry.load() is LLaDAEvalLM
    # What lm-eval releases that read the group do: the entry point as a lazy placeholder in
    # the model registry, loaded on first use (importing the module, whose `register` must
    # accept the placeholder), with the built-in models still there.
    done = run_python(
        """
        import importlib.metadata
        import lm_eval.models
        from lm_eval.api.registry import get_model, model_registry

        (entry,) = [
            e for e in importlib.metadata.entry_points(group="lm_eval.models")
            if e.name == "llada"
        ]
        model_registry.register("llada", target=entry)
        cls = get_model("llada")
        from llada.eval.lm_eval import LLaDAEvalLM

        assert cls is LLaDAEvalLM, cls
        assert get_model("dummy").__name__ == "DummyLM"
        print("OK")
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")


def test_register_is_idempotent_and_refuses_another_model_of_that_name(monkeypatch):
    from lm_eval.api import registry

    llada_lm_eval.register()
    llada_lm_eval.register()
    assert registry.get_model("llada") is LLaDAEvalLM

    class Other:
        pass

    monkeypatch.setattr(registry, "MODEL_REGISTRY", {"llada": Other})
    with pytest.raises(ValueError, match="already has a model named 'llada'"):
        llada_lm_eval.register()
    monkeypatch.setattr(registry, "MODEL_REGISTRY", {"llada": "elsewhere.models:LLaDA"})
    with pytest.raises(ValueError, match="elsewhere.models:LLaDA"):
        llada_lm_eval.register()
    monkeypatch.setattr(registry, "MODEL_REGISTRY", {"llada": llada_lm_eval.MODEL_TARGET})
    llada_lm_eval.register()  # the lazy placeholder of this very class


def test_lm_evals_batch_size_is_requests_per_batch_and_the_model_arg_the_mc_batch(
    chat_checkpoint,
):
    args = ",".join(f"{k}={v}" for k, v in MODEL_ARGS.items() if k != "gen_batch_size")
    arg_string = f"pretrained={chat_checkpoint},{args}"
    # Both batch sizes at once: lm-eval's used to collide with the model arg.
    lm = LLaDAEvalLM.create_from_arg_string(
        arg_string, {"batch_size": "3", "max_batch_size": None, "device": "cpu"}
    )
    assert (lm.settings.batch_size, lm.request_batch_size) == (MODEL_ARGS["batch_size"], 3)
    assert lm.generation_batch_size == 3
    explicit = LLaDAEvalLM.create_from_arg_obj(
        {"pretrained": str(chat_checkpoint), **MODEL_ARGS}, {"batch_size": 3, "device": "cpu"}
    )
    assert explicit.generation_batch_size == MODEL_ARGS["gen_batch_size"]  # the model arg wins
    auto = LLaDAEvalLM.create_from_arg_string(arg_string, {"batch_size": "auto", "device": "cpu"})
    assert (auto.request_batch_size, auto.generation_batch_size) == (None, 8)
    assert auto.settings.batch_size == MODEL_ARGS["batch_size"]


@pytest.mark.parametrize("value", ["0", "-2", "eight", "2.5", True])
def test_a_wrong_lm_eval_batch_size_is_one_clear_error(value):
    with pytest.raises(ValueError, match="requests per batch"):
        parse_request_batch_size(value)


def test_auto_is_no_cap_and_integers_pass():
    assert [parse_request_batch_size(v) for v in (None, "auto", "auto:4", "8", 8)] == [
        None,
        None,
        None,
        8,
        8,
    ]


def test_auto_as_the_model_arg_batch_size_says_which_batch_size_it_is(chat_checkpoint):
    with pytest.raises(ValueError, match="--batch_size auto"):
        LLaDAEvalLM(pretrained=str(chat_checkpoint), device="cpu", batch_size="auto")


def test_request_cap_bounds_each_forward_and_changes_no_score(chat_checkpoint, monkeypatch):
    from llada.api import load

    lm = LLaDAEvalLM(
        pretrained=str(chat_checkpoint), device="cpu", request_batch_size=2, **MODEL_ARGS
    )
    model, tokenizer, _ = load(chat_checkpoint, dtype="float32")
    question = tokenizer("What is 2 + 3? The answer is")["input_ids"]
    pairs = [(question, [40]), (question, [41]), (question, [42]), (question, [43])]
    pairs += [(question[1:], [41, 42]), (question[2:], [42, 43])]  # same length as [40]
    pairs.append(reference_split(tokenizer, "To be, or not to be", ", that is the question"))
    forwards: list[set[int]] = []
    score_units = LLaDAEvalLM._score_units

    def spy(self, units, totals):
        forwards.append({u.request for u in units})
        return score_units(self, units, totals)

    monkeypatch.setattr(LLaDAEvalLM, "_score_units", spy)
    scores = lm.elbo_scores(pairs)
    expected = [seeded_log_likelihood(model, p, a) for p, a in pairs]
    assert scores == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert max(len(f) for f in forwards) == 2  # packed, but never more than the cap
    assert set().union(*forwards) == set(range(len(pairs)))
    forwards.clear()
    uncapped = LLaDAEvalLM(pretrained=str(chat_checkpoint), device="cpu", **MODEL_ARGS)
    uncapped.elbo_scores(pairs)
    assert max(len(f) for f in forwards) > 2  # the cap, not the token budget, bounded them


@pytest.fixture(scope="module")
def in_process(chat_checkpoint, task_folder):
    """The oracle: the three tasks through `lm_eval.simple_evaluate` in this process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as monkeypatch:
        go_offline(monkeypatch)
        return lm_eval.simple_evaluate(
            model="llada",
            model_args={"pretrained": str(chat_checkpoint), **MODEL_ARGS},
            tasks=list(TASKS),
            task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
            device="cpu",
            bootstrap_iters=0,
        )


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_llada(chat_checkpoint, task_folder, in_process, tmp_path):
    model_args = ",".join(
        f"{k}={v}" for k, v in {"pretrained": chat_checkpoint, **MODEL_ARGS}.items()
    )
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "llada.eval",
        "--model",
        "llada",
        "--model_args",
        model_args,  # holds batch_size (the Monte Carlo mini-batch) ...
        "--batch_size",
        "2",  # ... beside lm-eval's requests per batch
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        str(task_folder),
        "--device",
        "cpu",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (written,) = out.rglob("results_*.json")
    saved = json.loads(written.read_text())
    assert saved["config"]["model"] == "llada"
    for task in TASKS:
        for metric, value in in_process["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert saved["results"][task][metric] == pytest.approx(value, rel=1e-6), (
                    task,
                    metric,
                )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_lm_evals_default_device_falls_back_to_cpu_without_cuda(chat_checkpoint, caplog):
    lm = LLaDAEvalLM.create_from_arg_obj(
        {"pretrained": str(chat_checkpoint), **MODEL_ARGS}, {"device": "cuda:0"}
    )
    assert lm.device.type == "cpu"
    assert "no CUDA device here; running on cpu" in caplog.text
