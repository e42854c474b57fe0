"""`llada data`: train a tokenizer, tokenise a corpus into a token file."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="prepare training data", description="Prepare training data."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    tokenizer = commands.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer with LLaDA's special tokens and chat template",
    )
    tokenizer.add_argument("corpus", nargs="+", help="text/JSONL files or folders")
    tokenizer.add_argument("--vocab-size", type=int, default=4096)
    tokenizer.add_argument(
        "--family",
        choices=("llada-8b", "llada-moe"),
        default="llada-8b",
        help="special tokens and chat template: LLaDA-8B's (<|mdm_mask|>, headers, <|eot_id|>) or "
        "LLaDA-MoE / LLaDA 2.x's (<|mask|>, <role>, <|role_end|>); default: llada-8b",
    )
    tokenizer.add_argument(
        "--out", required=True, help="folder for tokenizer.json and tokenizer_config.json"
    )
    tokenizer.set_defaults(run=run_train_tokenizer)

    tokenize = commands.add_parser(
        "tokenize", help="tokenise a corpus into OUT.bin + OUT.json for pre-training"
    )
    tokenize.add_argument("corpus", nargs="+", help="text/JSONL files or folders")
    tokenize.add_argument("--tokenizer", required=True, help="folder with the tokenizer files")
    tokenize.add_argument(
        "--out", required=True, help="output path (OUT.bin and OUT.json are written)"
    )
    tokenize.set_defaults(run=run_tokenize)


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from ..tokenizer import train_tokenizer
    from ..train.data import iter_corpus

    out = train_tokenizer(iter_corpus(args.corpus), args.vocab_size, args.out, family=args.family)
    print(f"tokenizer written to {out}")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer
    from ..tokens import resolve_special_tokens
    from ..train.data import TokenFile, iter_corpus, write_token_file

    tokenizer = load_tokenizer(args.tokenizer)
    tokens = resolve_special_tokens({}, args.tokenizer, len(tokenizer))
    path = write_token_file(iter_corpus(args.corpus), tokenizer, args.out, tokens.eos_id)
    print(f"{len(TokenFile(path)):,} tokens written to {path}")
    return 0
