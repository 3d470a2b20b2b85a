"""`alchemist serve` (the HTTP server) and `alchemist generate` (one offline generation)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from common.errors import AlchemistError

# commands whose module provides add_parser(subparsers) and main(args) -> exit code
SUBCOMMANDS = {"check-grad": "trainer.check_grad", "export-adapter": "server.export",
               "simulate": "trainer.simulate", "perplexity": "trainer.perplexity"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alchemist", description="Serve a chat model and learn from ratings.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the OpenAI-compatible server")
    s.add_argument("--config", help="JSON config file (server options + an 'engine' object)")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--api-key", action="append", dest="api_keys", default=[],
                   help="accepted bearer key (repeatable; also ALCHEMIST_API_KEYS=k1,k2)")
    s.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("--served-model-name", help="name clients pass as 'model'")
    s.add_argument("--db-path", help="feedback database (default $ALCHEMIST_HOME/alchemist.db)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), help="engine device")
    s.add_argument("--log-level", help="debug, info, warning, error")
    s.add_argument("--admin-api-key", action="append", dest="admin_api_keys", default=[],
                   help="key that may also call the admin API (repeatable; also ALCHEMIST_ADMIN_KEYS=k1,k2)")
    s.add_argument("--no-training", action="store_true", help="serve only: no online training")
    g = sub.add_parser("generate", help="generate one answer offline and print it")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    g.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--config", help="JSON config file (its 'engine' object is used)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return p


def _config(args):
    from server.config import build_config
    overrides = {"served_model_name": getattr(args, "served_model_name", None),
                 "db_path": getattr(args, "db_path", None), "log_level": getattr(args, "log_level", None)}
    cfg = build_config(args.config, host=getattr(args, "host", None), port=getattr(args, "port", None),
                       api_keys=getattr(args, "api_keys", None), model=args.model, overrides=overrides,
                       admin_api_keys=getattr(args, "admin_api_keys", None),
                       training=False if getattr(args, "no_training", False) else None)
    if args.device:
        cfg.engine.device = args.device
    return cfg


def serve(args) -> int:
    import uvicorn

    from server.app import create_app
    from server.http_protocol import uvicorn_config
    from server.state import ServerState
    cfg = _config(args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = ServerState.build(cfg)
    log = logging.getLogger("alchemist.server")
    log.info("serving %s on http://%s:%d (auth %s, db %s)", state.model_name, cfg.host, cfg.port,
             "on" if cfg.api_keys or cfg.admin_api_keys else "off", cfg.resolved_db_path())
    log.info("online training %s (checkpoints in %s)", "on" if state.trainer else "off", state.run_dir)
    try:
        server = uvicorn.Server(uvicorn_config(create_app(state), cfg))   # limits: server/http_protocol.py
        server.run()                          # returns after SIGINT/SIGTERM and the lifespan shutdown
    finally:
        state.close()
    return 0


def generate(args) -> int:
    from engine.embedded_model import ensure_default_model
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from server.tokens import TokenTexts
    cfg = _config(args)
    if not cfg.engine.model:
        cfg.engine.model = str(ensure_default_model())
    engine = LLMEngine(cfg.engine)
    tokens = TokenTexts(engine.tokenizer)
    if args.raw:
        prompt = tokens.text_prompt(args.prompt)
    else:
        prompt = tokens.chat_prompt([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    seq = engine.generate([prompt], params)[0][0]
    print(engine.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in SUBCOMMANDS:
            return importlib.import_module(SUBCOMMANDS[args.command]).main(args)
        return serve(args) if args.command == "serve" else generate(args)
    except AlchemistError as err:            # configuration problems: one clear line, no traceback
        print(f"alchemist: {err.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
