# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Model cards (from ``MODEL_CARD_TEMPLATE.md``) and pushing a finished folder to the Hub."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers.utils import logging

logger = logging.get_logger(__name__)

TEMPLATE_PATH = Path(__file__).with_name("MODEL_CARD_TEMPLATE.md")
CARD_INFO_FILE = "blockdiff_card.json"  # what the card was rendered from, so a later push or training can re-render
# The Hub-portable modules (docs/design.md 4): a converted folder carries them as remote code. The one list of them.
PORTABLE_FILES = (
    "modeling_blockdiff.py",
    "masks.py",
    "denoise.py",
    "engine.py",
    "decoding.py",
    "draft_tree.py",
    "policies.py",
    "settings.py",
    "noisy_adapter.py",
    "compat.py",
    "attention.py",
)
REQUIRED_FILES = ("config.json", "generation_config.json", "README.md", *PORTABLE_FILES)


def render_model_card(
    config,
    base_model: str | None = None,
    license: str | None = None,
    conversion: dict | None = None,
    training: dict | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """The model card of a block-diffusion checkpoint, rendered from ``MODEL_CARD_TEMPLATE.md``."""
    architecture = (config.architectures or [config.model_type])[0].replace("BlockDiffusion", "")
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["block-diffusion", "hf_blockdiff", config.model_type],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name or (repo_id.split("/")[-1] if repo_id else f"Block-diffusion {architecture}"),
        repo_id=repo_id or "path/to/this/folder",
        architecture=architecture,
        block_size=getattr(config, "block_size", 1),
        threshold=0.9,
        conversion=conversion
        or {"block_size": getattr(config, "block_size", 1), "mask_token_id": config.mask_token_id},
        training=training,
    )


def write_model_card(directory, config, **info) -> Path:
    """Render the card into ``directory/README.md`` and keep its inputs next to it."""
    directory = Path(directory)
    render_model_card(config, **info).save(directory / "README.md")
    (directory / CARD_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return directory / "README.md"


def _card_info(directory) -> dict:
    path = Path(directory) / CARD_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _rendered_card(directory, **changes) -> ModelCard:
    """The folder's card re-rendered with some inputs changed (e.g. ``training=...`` or ``repo_id=...``)."""
    from transformers import AutoConfig

    info = _card_info(directory) | {k: v for k, v in changes.items() if v is not None}
    return render_model_card(AutoConfig.from_pretrained(directory), **info)


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hub answers one quick request (once per process). huggingface_hub retries a dead network for
    ~50 s before it gives up, so whoever needs the Hub asks this first."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=5)  # any HTTP answer will do
    except Exception:  # noqa: BLE001 - whatever the failure, the Hub cannot be used now
        return False
    return True


def _why_unreachable() -> tuple[str, str]:
    """(what is wrong, what to do) when :func:`hub_reachable` is False."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE"
    return f"{constants.ENDPOINT} cannot be reached", "check the network"


def check_hub_download(repo_id: str, filename: str = "config.json") -> str | None:
    """Fail at once, naming ``repo_id``, when it would have to be downloaded but the Hub cannot be reached (offline
    or no network) and the local cache lacks it. Returns the cached snapshot folder to load instead when the Hub
    cannot be reached (transformers would still ask the Hub for optional files, retrying each for ~50 s)."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if hub_reachable():
        return None
    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return snapshot_download(repo_id, local_files_only=True)
    why, fix = _why_unreachable()
    raise ConnectionError(f"{repo_id!r} is not a local folder or file, and it cannot be downloaded from the Hub: "
                          f"{why} and it is not in the cache. Check the name (a local folder is written "
                          f"./{repo_id}), or {fix}.")  # fmt: skip


def check_hub_upload(repo_id: str):
    """Fail at once when a push to ``repo_id`` cannot work, before the work whose result it would push."""
    if not hub_reachable():
        why, fix = _why_unreachable()
        raise ConnectionError(f"Cannot push to {repo_id}: {why}; {fix}.")


def check_folder(directory) -> Path:
    """A folder ready to push: everything a block-diffusion checkpoint needs, or a clear error."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"{directory} {what}: pass the folder that `hf_blockdiff convert` or a trainer wrote.")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if not any(directory.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a complete block-diffusion checkpoint (missing: {', '.join(missing)}). "
            "Make it with `hf_blockdiff convert` or save a converted model with `save_pretrained`."
        )
    config = json.loads((directory / "config.json").read_text())
    if "AutoModelForCausalLM" not in config.get("auto_map", {}):
        raise ValueError(f"{directory}/config.json has no auto_map entry for AutoModelForCausalLM.")
    return directory


def push_to_hub(directory, repo_id: str, private: bool | None = None, revision: str | None = None,
                token: str | None = None, commit_message: str | None = None) -> str:  # fmt: skip
    """Upload a finished folder in one commit and return the commit URL.

    The card is re-rendered in memory so that its snippet names ``repo_id``; local files are never modified.
    Without a network this fails fast with a message that says so.
    """
    from huggingface_hub import CommitOperationAdd

    directory = check_folder(directory)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(directory).as_posix(), path_or_fileobj=str(path))
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    ]
    if (directory / CARD_INFO_FILE).is_file():
        card = _rendered_card(directory, repo_id=repo_id)
        operations = [op for op in operations if op.path_in_repo != "README.md"]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id, operations, revision=revision,
            commit_message=commit_message or "Upload block-diffusion checkpoint (hf_blockdiff)",
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - re-raised with what the user needs to know
        if _is_offline_error(error):
            raise ConnectionError(
                f"Could not reach the Hugging Face Hub to push {directory} to {repo_id} ({type(error).__name__}). "
                "Check the network (HF_HUB_OFFLINE must be unset); the local folder is untouched."
            ) from error
        raise
    return str(getattr(info, "commit_url", info))


def _is_offline_error(error: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    names = {type(e).__name__ for e in _chain(error)}
    return isinstance(error, (OfflineModeIsEnabled, ConnectionError, TimeoutError)) or bool(
        names
        & {
            "ConnectError",
            "ConnectTimeout",
            "ConnectionError",
            "NameResolutionError",
            "OfflineModeIsEnabled",
            "MaxRetryError",
            "ReadTimeout",
            "LocalEntryNotFoundError",
        }  # fmt: skip
    )


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
