"""lm-evaluation-harness's own command line, with the `llada` model registered.

    python -m llada.eval --model llada --model_args pretrained=PATH --tasks TASK --batch_size 8
    accelerate launch -m llada.eval --model llada --model_args pretrained=PATH --tasks TASK

Every flag is lm-eval's (`python -m llada.eval --help`; subcommands such as `ls tasks` too).
lm-eval up to 0.4.13 finds models only in its own registry and reads no plugins, so a
command line that can name `--model llada` has to import the model first: this one does
(`llada.eval.lm_eval.register`, which keeps lm-eval's built-in models). lm-eval releases that
read `lm_eval.models` entry points find `llada` from the installed package, and plain
`lm_eval --model llada` works there too.
"""

from __future__ import annotations


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit(
            "python -m llada.eval needs lm-evaluation-harness: pip install 'llada-kit[eval]'"
        ) from None
    from . import lm_eval as _registers_the_model  # noqa: F401

    cli_evaluate()


if __name__ == "__main__":
    main()
