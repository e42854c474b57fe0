"""`llada serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with request batching."""

from __future__ import annotations

import argparse
import os
import sys

from ..generation_config import generation_defaults
from ..serve.config import ServeConfig
from .options import (
    add_dataclass_arguments,
    add_model_arguments,
    add_runtime_arguments,
    add_sampler_arguments,
    add_tensor_parallel_argument,
    dataclass_from_args,
    decode_from_args,
    given_sampler_flags,
    load_from_args,
    sampler_config,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (with "
        "streaming), /health and /metrics. Concurrent requests share sampler calls when their "
        "canvas, steps, guidance and preset agree (temperature, remasking, threshold and seed "
        "stay per request; --no-mixed-batches: identical settings only). The sampler flags are the defaults of a request; a request may "
        "override them with extra body fields (steps, gen_length, block_length, cfg_scale, "
        "remasking, threshold, preset; for LLaDA 2.x top_k, top_p, editing_threshold, "
        "max_post_steps, eos_early_stop) and temperature / max_tokens. Set the API key in the "
        "LLADA_API_KEY environment variable (a --api-key flag shows in `ps`). On SIGTERM or "
        "Ctrl-C the server stops accepting, gives requests in flight --shutdown-grace seconds, "
        "then cancels the rest and exits.",
    )
    add_model_arguments(parser)
    add_runtime_arguments(parser)
    add_tensor_parallel_argument(parser)
    add_sampler_arguments(parser, "serve")
    add_dataclass_arguments(parser, ServeConfig, "server")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from ..serve.app import create_app
        from ..serve.server import Server, bind, uvicorn_config
    except ImportError as error:
        raise ValueError(
            f"llada serve needs FastAPI and uvicorn ({error}): pip install 'llada-kit[serve]'"
        ) from None
    import torch

    if args.api_key is not None:
        print(
            "warning: --api-key is visible to other users of this machine (ps); "
            "set LLADA_API_KEY instead",
            file=sys.stderr,
        )
    elif os.environ.get("LLADA_API_KEY"):
        args.api_key = os.environ["LLADA_API_KEY"]
    config = dataclass_from_args(ServeConfig, args)
    # Under torchrun with --tensor-parallel only rank 0 serves; the others follow its sampler
    # calls (llada.serve.lockstep).
    follower = args.tensor_parallel and os.environ.get("RANK", "0") != "0"
    # Bind before loading the model: a busy port is one line at once, not after the load.
    sock = None if follower else bind(config.host, config.port)
    try:
        model, tokenizer, _ = load_from_args(args)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    lockstep = None
    env = getattr(args, "parallel_env", None)
    if env is not None and env.enabled:
        from ..serve.lockstep import Lockstep

        lockstep = Lockstep(env.device if env.device.type == "cuda" else None)
        if follower:
            torch.manual_seed(args.seed)
            lockstep.follow(model)
            return 0
    if config.api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {config.host} without an API key (set LLADA_API_KEY)",
            file=sys.stderr,
        )
    torch.manual_seed(args.seed)
    sampler = sampler_config(args, model)
    decode = decode_from_args(args, model)
    # A request without max_tokens gets --gen-length when it was given (or the checkpoint's
    # generation_config.json names one), else what the model's context allows.
    folder = getattr(model, "checkpoint_folder", None)
    stored = generation_defaults(folder) if folder is not None else {}
    named = "gen_length" in given_sampler_flags(args) or "gen_length" in stored
    app = create_app(
        model,
        tokenizer,
        config,
        sampler,
        preset=decode,
        lockstep=lockstep,
        default_max_tokens=sampler.gen_length if named else None,
    )
    shown_preset = decode if isinstance(decode, str) else args.preset or "custom"
    name = app.state.llada.model_name
    port = sock.getsockname()[1]
    shown_host = f"[{config.host}]" if ":" in config.host else config.host

    budget = (
        f"{sampler.gen_length} tokens"
        if named
        else f"up to the context, at most {config.max_gen_length} tokens"
    )

    def listening() -> None:
        print(
            f"llada serve: model {name!r} on http://{shown_host}:{port}/v1 "
            f"(preset {shown_preset}, answers without max_tokens: {budget}, block_length "
            f"{sampler.block_length}, steps per token {sampler.steps / sampler.gen_length:g})",
            file=sys.stderr,
            flush=True,
        )

    server = Server(uvicorn_config(app, config, log_level="warning"), on_listening=listening)
    server.run(sockets=[sock])
    return 0
