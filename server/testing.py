"""Test helpers: a real uvicorn server on a free loopback port in a background thread, and a tiny
random-weight Llama folder that loads in a second (SmolLM2's tokenizer, vocab 49152)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import uvicorn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


class ServerThread:
    """`with ServerThread(app) as srv: srv.url` -- uvicorn bound to 127.0.0.1:0 (a free port)."""

    def __init__(self, app, log_level: str = "warning"):
        state = getattr(app.state, "alchemist", None)
        if state is not None:                    # the limits `alchemist serve` runs with
            from server.http_protocol import uvicorn_config
            config = uvicorn_config(app, state.config, host="127.0.0.1", port=0, log_level=log_level,
                                    timeout_graceful_shutdown=2)
        else:
            config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level=log_level,
                                    timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(cmd: list[str], env: dict, log: Path, url: str, cwd: Path | None = None,
                  timeout: float = 90.0) -> subprocess.Popen:
    """Start `alchemist serve` (cmd) with output appended to `log`; return once /health answers 200."""
    import httpx
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not come up:\n{log.read_text()[-3000:]}")


def make_tiny_model(target: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights in safetensors plus the given tokenizer files
    (reused when `target` already holds one: config.json is written last)."""
    if (target / "config.json").exists():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from engine.loader import build_empty, init_random

    target.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = build_empty(config, config.max_position_embeddings, torch.device("cpu"), torch.float32)
    init_random(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight" and not k.endswith("inv_freq")}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists() and name != "generation_config.json":
            shutil.copy(Path(tokenizer_dir) / name, target / name)
    return target


def tiny_state(model_dir: Path, db_path: Path, run_dir: Path | None = None, **server_options):
    """A ServerState over the tiny model on CPU (small KV cache, small activation pool) with a fresh
    feedback database. Online training is off unless `training=TrainerConfig(...)` is passed; its
    checkpoints go to `run_dir` (default: runs/default next to the database), never $ALCHEMIST_HOME."""
    from engine.config import EngineConfig
    from server.config import ServerConfig
    from server.state import ServerState
    from trainer.config import TrainerConfig
    server_options.setdefault("training", TrainerConfig(enabled=False))
    engine = EngineConfig(model=str(model_dir), device="cpu", kv_cache_bytes=32 << 20,
                          activation_pool_bytes=32 << 20)
    config = ServerConfig(db_path=str(db_path), engine=engine, **server_options)
    return ServerState.build(config, run_dir=run_dir or Path(db_path).parent / "runs" / "default")
