"""The variance of VRPO's preference score and of its gradient, by variance reduction.

LLaDA 1.5 (arXiv 2505.19223) replaces DPO's log-likelihoods by masked-diffusion ELBO estimates
and lowers the variance of the resulting preference score
    s = (B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))
by (i) a larger budget n of draws per ELBO, (ii) spending the budget on n distinct timesteps with
one mask each ('timesteps' allocation, against 'naive': one timestep, n masks), and (iii)
antithetic sampling (the policy's and the reference's estimates share their draws).

This script fixes a set of preference pairs (questions of the generated tasks,
`llada.eval.tasks`: the task's answer as chosen, a corrupted answer as rejected) and a policy and
reference, then repeats the estimate `--repeats` times under each setting, with fresh draws each
time (`llada.losses.preference_loss`, what `llada train --objective vrpo` runs), and reports:
- score var: the variance of each pair's score over the repeats, averaged over the pairs;
- grad var: the total variance of the gradient of the DPO loss (mean over the pairs) with
  respect to all policy weights, tr Cov(g) = E|g - E g|^2, and the same over |E g|^2;
each next to the naive n=1 setting (plain DPO on one-draw ELBOs). All settings run in one
process on the same pairs and models; the n=8 rows are at equal budget.

Two cases: 'far' scores llada-tiny-instruct against llada-tiny-base (its SFT starting point);
'near' a policy a small step from its reference: reference llada-tiny-instruct, policy
instruct + step * (instruct - base), the situation of a preference run's early steps.

    OMP_NUM_THREADS=1 python bench/vrpo_variance.py --repeats 16 --per-task 1
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import llada
from llada.eval.tasks import SYNTHETIC_TASKS, synthetic_examples
from llada.losses import preference_loss
from llada.tokenizer import load_tokenizer, render_chat
from llada.tokens import special_tokens_of

# (budget, allocation, antithetic, what it is); the n=1 row is the baseline of every ratio.
SETTINGS = (
    (1, "naive", False, "naive, n=1 (baseline)"),
    (1, "naive", True, "antithetic alone, n=1"),
    (8, "naive", False, "budget alone: naive, n=8"),
    (8, "timesteps", False, "budget + allocation, n=8"),
    (8, "naive", True, "budget + antithetic, n=8"),
    (8, "timesteps", True, "all three (VRPO), n=8"),
)


def corrupted(answer: str, index: int) -> str:
    """A wrong answer of the same shape: a number moved by 1-3, or two items swapped."""
    items = answer.split(" ")
    if len(items) == 1:
        return str(int(answer) + 1 + index % 3)
    swapped = items[:]
    swapped[0], swapped[-1] = swapped[-1], swapped[0]
    if swapped == items:
        swapped.append(items[0])
    return " ".join(swapped)


def pairs_batch(tokenizer, special_tokens, per_task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs as `llada.train.data.PreferencePairs` lays them out: chosen rows, then
    rejected rows, each prompt + answer + EoT + EOS, padded with EOS."""
    end = [special_tokens.eot_id, special_tokens.eos_id]
    prompts, chosen, rejected = [], [], []
    for task in SYNTHETIC_TASKS:
        for i, example in enumerate(synthetic_examples(task, per_task, seed=7)):
            messages = [{"role": "user", "content": example.prompt}]
            prompts.append(
                tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
            )
            chosen.append(tokenizer(example.answer, add_special_tokens=False)["input_ids"] + end)
            wrong = corrupted(example.answer, i)
            rejected.append(tokenizer(wrong, add_special_tokens=False)["input_ids"] + end)
    rows = list(zip(prompts, chosen, strict=True)) + list(zip(prompts, rejected, strict=True))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), special_tokens.eos_id, dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
    return ids, torch.tensor([len(p) for p, _ in rows])


def measure(policy, reference, x0, prompt_lengths, mask_id, setting, repeats, beta, seed):
    budget, allocation, antithetic, _ = setting
    weights = [p for p in policy.parameters() if p.requires_grad]
    scores = []
    grad_sum = [torch.zeros_like(p) for p in weights]
    grad_square = 0.0
    for repeat in range(repeats):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + repeat)
        policy.zero_grad(set_to_none=True)
        out = preference_loss(
            policy, reference, x0, prompt_lengths, mask_id, beta=beta, budget=budget,
            allocation=allocation, antithetic=antithetic, generator=generator,
        )  # fmt: skip
        out.loss.backward()
        scores.append(out.scores)
        for total, p in zip(grad_sum, weights, strict=True):
            total += p.grad
        grad_square += sum(float(p.grad.double().pow(2).sum()) for p in weights)
    scores = torch.stack(scores)  # (R, P)
    mean_norm = sum(float((t.double() / repeats).pow(2).sum()) for t in grad_sum)
    # Unbiased: tr Cov = R/(R-1) (mean |g|^2 - |mean g|^2).
    grad_var = repeats / (repeats - 1) * (grad_square / repeats - mean_norm)
    return float(scores.var(dim=0).mean()), grad_var, mean_norm


def step_policy(instruct, base, step):
    policy = llada.load_model(instruct, dtype=torch.float32)
    base_state = llada.load_model(base, dtype=torch.float32).state_dict()
    with torch.no_grad():
        for name, tensor in policy.state_dict().items():
            tensor += step * (tensor - base_state[name])
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instruct", default="models/llada-tiny-instruct")
    parser.add_argument("--base", default="models/llada-tiny-base")
    parser.add_argument("--cases", default="far,near", help="far, near or both")
    parser.add_argument("--near-step", type=float, default=0.05)
    parser.add_argument("--per-task", type=int, default=2, help="pairs per generated task")
    parser.add_argument("--repeats", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)
    tokenizer = load_tokenizer(args.instruct)
    for case in args.cases.split(","):
        if case == "far":
            policy = llada.load_model(args.instruct, dtype=torch.float32)
            reference = llada.load_model(args.base, dtype=torch.float32)
            title = f"policy {args.instruct}, reference {args.base}"
        else:
            policy = step_policy(args.instruct, args.base, args.near_step)
            reference = llada.load_model(args.instruct, dtype=torch.float32)
            title = (
                f"policy instruct + {args.near_step:g} (instruct - base), reference {args.instruct}"
            )
        policy.eval()  # no dropout: the variance is the estimator's alone
        reference.eval()
        for p in policy.parameters():
            p.requires_grad_(True)
        special = special_tokens_of(policy)
        x0, prompt_lengths = pairs_batch(tokenizer, special, args.per_task)
        print(
            f"\n## case '{case}': {title}; {x0.shape[0] // 2} pairs, beta {args.beta:g}, "
            f"{args.repeats} repeats per setting"
        )
        print("| setting | n | allocation | antithetic | score var | vs baseline | grad var "
              "tr Cov(g) | vs baseline | tr Cov(g) / |E g|^2 | s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        base_score = base_grad = None
        for setting in SETTINGS:
            started = time.perf_counter()
            score_var, grad_var, mean_norm = measure(
                policy, reference, x0, prompt_lengths, special.mask_id, setting, args.repeats,
                args.beta, args.seed,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            if base_score is None:
                base_score, base_grad = score_var, grad_var
            budget, allocation, antithetic, name = setting
            print(
                f"| {name} | {budget} | {allocation if budget > 1 else '-'} | "
                f"{'yes' if antithetic else 'no'} | {score_var:.4g} | "
                f"{score_var / base_score:.3f} | {grad_var:.4g} | {grad_var / base_grad:.3f} | "
                f"{grad_var / mean_norm:.3g} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
