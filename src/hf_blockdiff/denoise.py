# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""``generate()`` for block-diffusion models: settings in, the decode engine's tokens out (docs/design.md 2.5).

Hub-portable: imports only torch, transformers and its sibling files.

    prefill:  one causal forward over the prompt fills the cache; its last logit gives block 0's first token.
    per block of size b, input [first, MASK x (b-1)]:
      denoise: forward the block against the cache; choose a token for every masked position; commit those the
               commit rule picks; repeat until none is masked.
      commit:  one causal forward over the finished block writes its KV (so the committed part of the cache always
               equals a causal prefill of the committed tokens) and its last logit gives the next block's first token.

The loop itself is :class:`engine.DecodeEngine`: every row advances on its own, one forward at a time; this module
resolves the settings, builds the commit rule and sampling settings, and assembles the output.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .engine import DecodeEngine
from .masks import attention_backend
from .policies import AnyOf, FixedSteps, RepeatGuard, Sampling, Threshold, settings_of, structure_of
from .settings import SETTINGS, DecodeSettings

logger = logging.get_logger(__name__)

DEFAULT_THRESHOLD = 0.9
# generate() arguments that this decoder cannot honour; failing loudly beats silently ignoring them.
UNSUPPORTED = (
    "inputs_embeds",
    "logits_processor",
    "assistant_model",
    "prefix_allowed_tokens_fn",
    "negative_prompt_ids",
)


@dataclass
class BlockDiffusionGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)`` output.

    sequences: prompt + generated tokens, padded with ``pad_token_id`` after a row's end.
    num_forward_passes: every model forward of the batch (prefill, denoising steps, commits).
    row_forward_passes: ``(batch,)`` forwards each row took part in: what it would cost decoded alone.
    num_generated_tokens: ``(batch,)`` tokens each row generated, its EOS included.
    committed_at: ``(batch, new_tokens)`` the row's forward (1-based) that committed each token; -1 = padding.
    block_starts: per row, where each block begins among its new tokens (verified blocks vary in length).
    rejected_drafts: per row, ``(index, tokens)`` for every verified block whose draft was cut: the drafted
        tokens that were dropped from new-token ``index`` on (where the causal model's own token went instead).
    Tokens per forward: ``num_generated_tokens / row_forward_passes`` per row;
    ``num_generated_tokens.sum() / row_forward_passes.sum()`` for the batch as decoded (each forward serves every
    row that is still decoding, so this is the mean over rows weighted by their forwards).
    """

    sequences: torch.LongTensor | None = None
    num_forward_passes: int | None = None
    row_forward_passes: torch.LongTensor | None = None
    num_generated_tokens: torch.LongTensor | None = None
    committed_at: torch.LongTensor | None = None
    block_size: int | None = None
    block_starts: list[list[int]] | None = None
    rejected_drafts: list[list[tuple[int, list[int]]]] | None = None


@dataclass(kw_only=True)
class DenoisePolicy(DecodeSettings):
    """The block settings of one ``generate()`` call, resolved and validated (``threshold``, ``steps_per_block`` or
    both set; ``candidates``, ``use_cuda_graph`` and ``compile_step`` None where chosen by the batch or the
    device), with the transformers generation settings they go with."""

    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int
    mask_token_id: int | None
    return_dict_in_generate: bool = False
    stop_strings: list[str] | None = None

    def commit_rule(self, rows: int, device) -> AnyOf | Threshold | FixedSteps | RepeatGuard:
        """The commit rule these settings describe, with per-row tensors for ``rows`` rows."""
        rules = []
        if self.steps_per_block is not None:
            rules.append(FixedSteps(torch.full((rows,), self.steps_per_block, device=device)))
        if self.threshold is not None:
            rules.append(Threshold(torch.full((rows,), float(self.threshold), device=device)))
        rule = rules[0] if len(rules) == 1 else AnyOf(*rules)
        return RepeatGuard(rule) if self.repeat_guard else rule

    def sampling(self, rows: int, device) -> Sampling:
        return Sampling(
            do_sample=torch.full((rows,), self.do_sample, device=device),
            temperature=torch.full((rows,), float(self.temperature), device=device),
            top_k=torch.full((rows,), self.top_k or 0, device=device),
            top_p=torch.full((rows,), float(self.top_p) if self.top_p is not None else 1.0, device=device),
            filtered=bool(self.top_k) or (self.top_p is not None and self.top_p < 1),
        )


# ----------------------------------------------------------------------------------------------------------
# Settings


def verify_by_default(model) -> bool:
    """Whether ``generate()`` verifies unless told otherwise: on CUDA, where verified decoding is faster than
    threshold decoding and block size 1 (docs/design.md 2.6), and gives block size 1's tokens."""
    return model.device.type == "cuda"


def resolve_policy(model, prompt_length: int, generation_config, kwargs: dict) -> DenoisePolicy:
    """Merge ``generation_config`` (or the model's) with call kwargs, validate, and return the policy."""
    for name in UNSUPPORTED:
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"Block-diffusion generate() does not support `{name}`.")
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    passed = {name: kwargs.pop(name) for name in SETTINGS if name in kwargs}
    unused = gc.update(**kwargs)
    for key in ("use_cache", "synced_gpus"):
        unused.pop(key, None)
    if unused:
        logger.warning_once(f"generate() ignores arguments it does not know: {sorted(unused)}")
    if (gc.num_beams or 1) > 1:
        raise ValueError("Block-diffusion generate() does not support beam search (num_beams > 1).")

    # a call's settings win over generation_config's (a None given too)
    configured = DecodeSettings(**{name: getattr(gc, name, None) for name in SETTINGS})
    asked = replace(configured, **passed).validate()
    block_size = asked.block_size if asked.block_size is not None else getattr(model.config, "block_size", None) or 1
    verify = asked.verify
    if verify is None:  # lossless by default where it is faster; threshold decoding when the caller asks for it
        thresholded = DecodeSettings(**passed).asks_threshold_decoding() or (
            generation_config is not None and configured.asks_threshold_decoding())  # fmt: skip
        verify = block_size > 1 and not thresholded and verify_by_default(model)
    threshold = asked.threshold
    if threshold is None and asked.steps_per_block is None:
        threshold = DEFAULT_THRESHOLD
    settings = replace(asked, block_size=block_size, verify=verify, candidates=asked.candidates if verify else 0,
                       threshold=threshold, confidence=asked.confidence or "probability",
                       repeat_guard=bool(asked.repeat_guard)).validate()  # fmt: skip

    max_new_tokens = gc.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = gc.max_length - prompt_length
    if max_new_tokens < 1:
        raise ValueError(
            f"Nothing to generate: max_length={gc.max_length} leaves no room after a {prompt_length}-token prompt; "
            "set max_new_tokens."
        )
    min_new_tokens = (
        gc.min_new_tokens if gc.min_new_tokens is not None else max(0, (gc.min_length or 0) - prompt_length)
    )

    eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
    eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad_token_id = gc.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_ids[0] if eos_token_ids else 0
    do_sample = bool(gc.do_sample) and (gc.temperature is None or gc.temperature > 0)
    return DenoisePolicy(
        **asdict(settings),
        do_sample=do_sample,
        temperature=gc.temperature or 1.0,
        top_k=gc.top_k if do_sample and gc.top_k else None,
        top_p=gc.top_p if do_sample and gc.top_p is not None and gc.top_p < 1.0 else None,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        mask_token_id=getattr(model.config, "mask_token_id", None),
        return_dict_in_generate=bool(gc.return_dict_in_generate),
        stop_strings=[gc.stop_strings] if isinstance(gc.stop_strings, str) else gc.stop_strings,
    )


def check_inputs(model, input_ids, attention_mask, policy: DenoisePolicy):
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("generate() needs `input_ids` of shape (batch, prompt_length) with a non-empty prompt.")
    if attention_mask is not None:
        mask = attention_mask.bool()
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError(
                "Right padding found in attention_mask; block-diffusion generate() needs left padding "
                "(tokenizer.padding_side = 'left')."
            )
    prompt_lengths = attention_mask.sum(-1) if attention_mask is not None else torch.tensor([input_ids.shape[1]])
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    longest = int(prompt_lengths.max())
    if limit is not None and longest + policy.max_new_tokens > limit:
        raise ValueError(
            f"The prompt ({longest} tokens) plus max_new_tokens ({policy.max_new_tokens}) exceeds the model's "
            f"{limit} positions (max_position_embeddings); shorten the prompt or lower max_new_tokens."
        )
    if policy.block_size > 1:
        if policy.mask_token_id is None:
            raise ValueError(
                "config.mask_token_id is missing, so masked positions cannot be denoised. Convert the model with "
                "`hf_blockdiff.convert_model` / `hf_blockdiff convert`, or generate with block_size=1."
            )
        attention_backend(model.config)


# ----------------------------------------------------------------------------------------------------------
# generate()


@contextlib.contextmanager
def dense_attention(model):
    """The engine renders dense masks (a CUDA graph cannot build a flex ``BlockMask``): run flex models on sdpa."""
    if attention_backend(model.config) != "flex_attention":
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation("flex_attention")


def generate_blocks(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer=None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
):
    """Decode block by block; returns sequences, or a :class:`BlockDiffusionGenerateOutput`.

    ``generator`` drives sampling; each row draws its noise from it in turn, so with one shared generator a row's
    samples depend on the rows before it (as in transformers). Pass a list of generators (one per row) to make
    each row's samples independent of its batch.
    """
    tokenizer = kwargs.pop("tokenizer", None)
    config = generation_config if generation_config is not None else model.generation_config
    pad_given = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))  # before resolve_policy's default
    policy = resolve_policy(model, input_ids.shape[1] if input_ids is not None else 0, generation_config, kwargs)
    if attention_mask is None and pad_given is not None and input_ids is not None and input_ids.dim() == 2:
        # A padded batch without a mask: infer the mask as transformers' generate() does
        # (`_prepare_attention_mask_for_generation`), where the pad token occurs and is not an EOS token.
        if pad_given not in policy.eos_token_ids and bool((input_ids == pad_given).any()):
            attention_mask = input_ids.ne(pad_given).long()
    check_inputs(model, input_ids, attention_mask, policy)
    if policy.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer).")
        criteria = list(stopping_criteria or []) + [StopStringCriteria(tokenizer, policy.stop_strings)]
        stopping_criteria = StoppingCriteriaList(criteria)
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("A streamer supports batch size 1 only, as in transformers' generate().")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    batch, device = input_ids.shape[0], input_ids.device
    valid = attention_mask.bool()
    prompts = [input_ids[r][valid[r]].tolist() for r in range(batch)]
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch
    max_length = max(len(p) for p in prompts) + policy.max_new_tokens
    policy = verify_plan(policy, batch, device)
    with dense_attention(model):
        engine = decode_engine(model, policy, batch, max_length, device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        committed_at: list[list[int]] = [[] for _ in range(batch)]
        if streamer is not None:
            streamer.put(input_ids.cpu())
        events = engine.add(prompts, list(range(batch)), policy.max_new_tokens, policy.min_new_tokens,
                            generators=generators, verify=policy.verify)  # fmt: skip
        while True:
            for row, tokens, at, _ in events:
                generated[row] += tokens
                committed_at[row] += at
                if streamer is not None:
                    streamer.put(torch.tensor(tokens))
            if stopping_criteria and events:
                for row in _stopped_rows(stopping_criteria, input_ids, generated, _filler(policy)):
                    if engine.slots[row].busy:
                        engine.finish(row)
            if not any(slot.busy for slot in engine.slots):
                break
            events = engine.step()
            if streamer is not None and hasattr(streamer, "put_draft"):  # e.g. transformers' TextDiffusionStreamer
                streamer.put_draft(value=engine.draft(0).cpu())
    if streamer is not None:
        streamer.end()

    width = max(len(g) for g in generated)
    tokens = torch.full((batch, width), policy.pad_token_id, dtype=torch.long, device=device)
    at = torch.full((batch, width), -1, dtype=torch.long, device=device)
    for r in range(batch):
        tokens[r, : len(generated[r])] = torch.tensor(generated[r], dtype=torch.long)
        at[r, : len(generated[r])] = torch.tensor(committed_at[r], dtype=torch.long)
    sequences = torch.cat([input_ids, tokens], dim=1)
    if not policy.return_dict_in_generate:
        return sequences
    slots = engine.slots[:batch]
    return BlockDiffusionGenerateOutput(
        sequences=sequences,
        num_forward_passes=engine.num_forwards,
        row_forward_passes=engine.forwards.clone(),
        num_generated_tokens=torch.tensor([len(g) for g in generated], device=device),
        committed_at=at,
        block_size=policy.block_size,
        block_starts=[[i for i in slot.block_starts if i < len(g)] for slot, g in zip(slots, generated)],
        rejected_drafts=[[(i, t) for i, t in slot.rejected if i < len(g)] for slot, g in zip(slots, generated)],
    )


# One-forward verify on CUDA: candidates per verifying row while the step's query positions stay within this many
# (rows x block_size x (1 + (1 + guesses) x candidates): each candidate also has its guessing copies). Measured on an H200 with
# SmolLM2 (benchmarks/results/engine_verify_h200.md): at batch 1, 496 positions (b=16, 15 candidates) cost 1.36x
# the one position of block size 1 and give 2.34 tokens per forward.
QUERY_BUDGET = 512
# What an automatic verify plan (no ``candidates`` given) decodes with on CUDA, by the batch's rows: for fewer than
# ``rows``, ``(block size, candidates)``, None meaning as asked / by QUERY_BUDGET; from the last entry's rows on,
# block size 1 (verify's tokens without drafts). Any plan is lossless: only the speed differs. Measured on an H200
# (SmolLM2-135M + smollm2-bd16, bf16, 40 chat prompts, 128 tokens; tok/s against our own block size 1):
#   batch 1: b=8 / 16 with budget candidates 1.55-1.67x (engine_verify_h200.md);
#   batch 4: b=8 with budget candidates 1.09x, batch 8: 0.83x (verify_crossover.md, before the LM head's strided
#     input was fixed, which made every plan with candidates slower);
#   batch 16: b=4 with 1 candidate 1.10x, b=8 with 1 candidate 0.93x (engine_refactor_b16_64.md); 1.32x in a later
#     run (engine_guesses_b16_64.md);
#   batch 64: b=4 with 1 candidate 0.97x (verify_contiguous.md).
VERIFY_PLANS = ((5, None, None), (64, 4, 1))
# Guessing copies per candidate where QUERY_BUDGET sets both (no ``candidates`` nor ``guesses`` given): the
# candidates are what fits with this many copies each, the copies then fill the rest. At batch 1 the budget buys
# candidates or copies: CPU, fp32, SmolLM2 + drafter run 4 at step 860, 6 chat prompts, 48 tokens, b=16, about 480
# query positions each (benchmarks/results/drafter_guesses_cpu_fp32.json), tokens per forward by candidates x
# copies: 15 x 0 1.600, 15 x 1 1.725, 7 x 3 1.882, 5 x 5 1.946, 3 x 9 2.000, 2 x 14 1.973, 1 x 30 1.745. On an H200
# (bf16, smollm2-bd16, 40 chat prompts alone; engine_guesses_b1.md) 3 x 9 gave 2.47 tokens per forward and 2.65x HF
# static, 15 x 1 2.29 and 2.14x.
# A plan with a fixed candidate count keeps the one copy it was measured with.
GUESS_RATIO = 3
# Nodes of the tree of drafts (draft_tree.py) besides the chain where the budget sets the plan at batch 1 on CUDA:
# the candidates are what fits the budget without them, the copies fill what the tree leaves. H200, bf16,
# smollm2-bd16, 40 chat prompts alone, 128 tokens, one run (engine_tree_b1_move.md): 3 x 9 with the chain 2.45 tokens
# per forward at 3.31 ms, 710 tok/s (2.38x HF static); 3 x 8 with 64 nodes 2.62 at 3.37 ms, 742 tok/s (2.49x);
# 3 x 9 with 32 nodes 2.53 at 3.80 ms, 644 tok/s. Other batches are not measured: the chain there. That was a fixed
# tree; chosen per step (DecodeEngine.choose_tree) the same plan keeps 2.342 tokens per forward instead of 2.215 on
# the CPU (fp32, 6 prompts, engine_tree_chosen_cpu_fp32.md), and more nodes with fewer copies keep more (1 x 8 with
# 352 nodes: 2.445); which split is fastest on a GPU is not measured yet.
DEFAULT_TREE = 64


def verify_plans(device):
    """:data:`VERIFY_PLANS` where they were measured (CUDA); None elsewhere (verify then decodes as asked)."""
    return VERIFY_PLANS if torch.device(device).type == "cuda" else None


def verify_plan(policy: DenoisePolicy, rows: int, device) -> DenoisePolicy:
    """What a batch of ``rows`` asked to verify decodes with on CUDA (:data:`VERIFY_PLANS`): ``policy``, a smaller
    block with fewer candidates, or block size 1 without drafts where drafting does not pay (the same tokens,
    faster). Explicit ``candidates`` keep the policy as asked. On a CPU drafting saves forwards but not time (the
    quick start: 39 forwards at 14.7 tok/s against 54 at 28.4 for block size 1); it stays on there, where the CLI
    decodes at block size 1 by default anyway."""
    plans = verify_plans(device)
    if not policy.verify or policy.candidates is not None or plans is None:
        return policy
    for below, block_size, candidates in plans:
        if rows < below:
            if block_size is None or block_size >= policy.block_size:
                return policy
            return replace(policy, block_size=block_size, candidates=candidates)
    logger.info_once(f"verify: {rows} rows decode at block size 1, which gives verify's tokens faster here "
                     f"(denoise.VERIFY_PLANS); pass candidates= to draft anyway.")  # fmt: skip
    return replace(policy, block_size=1, verify=False, candidates=0)


def verify_candidates(policy: DenoisePolicy, rows: int, device) -> int:
    """How many candidate next blocks a verifying forward drafts (docs/design.md 2.6).

    A candidate helps only when the verification keeps exactly the prefix it is anchored at, but every candidate
    costs ``(1 + guesses) x block_size`` query positions in every forward. On a GPU, extra positions are nearly free while a
    step is bound by reading the weights (small batches), so acceptance lengths get one each up to the budget. On a
    CPU they cost their full compute: one candidate triples a block's query positions, and the quick start's
    verify run (SmolLM2, b=16) took 35 forwards instead of 39 but ran at 5.1 instead of 14.7 tokens/s, so none
    there (a drafting forward of its own).
    """
    if not policy.verify:
        return 0
    if policy.candidates is not None:
        return policy.candidates
    b = policy.block_size
    if torch.device(device).type != "cuda":
        return 0
    units = _budget_units(policy, rows)
    if policy.guesses is not None:
        fits = units // (1 + policy.guesses)
    else:  # the most candidates with GUESS_RATIO copies each: C * (1 + GUESS_RATIO * C) <= units
        fits = int((math.sqrt(1 + 4 * GUESS_RATIO * units) - 1) / (2 * GUESS_RATIO))
    return max(1, min(b, fits))


def verify_guesses(policy: DenoisePolicy, rows: int, device, candidates: int) -> int:
    """Guessing copies per candidate (docs/design.md 2.6) of ``candidates`` (:func:`verify_candidates`): as asked;
    else, where the budget set the candidates, what of it they leave (:data:`GUESS_RATIO`); else 1."""
    if policy.guesses is not None or not candidates:
        return policy.guesses or 0
    if policy.candidates is not None or torch.device(device).type != "cuda":
        return 1
    return max(1, _budget_units(policy, rows) // candidates - 1)


def verify_tree(policy: DenoisePolicy, rows: int, device, candidates: int) -> int:
    """Tree nodes besides the chain (:data:`DEFAULT_TREE`) of one-forward verify with ``candidates``: as asked;
    else where measured faster (one row on CUDA, the plan set by the budget); else none."""
    if policy.draft_tree is not None or not candidates:
        return policy.draft_tree or 0
    automatic = policy.candidates is None and policy.guesses is None
    return DEFAULT_TREE if automatic and rows == 1 and torch.device(device).type == "cuda" else 0


def _budget_units(policy: DenoisePolicy, rows: int) -> int:
    """Candidate blocks (candidates and their copies, each ``candidate_width`` positions) that fit beside each row's
    block and tree of drafts in QUERY_BUDGET."""
    width = min(policy.candidate_width or policy.block_size, policy.block_size)
    return max(0, (QUERY_BUDGET // max(rows, 1) - policy.block_size - (policy.draft_tree or 0)) // width)


# An engine's slots are sized in steps of this many positions, so that calls with nearby lengths share one.
ENGINE_LENGTH_STEP = 256


class _EngineHolder:
    """Keeps a model's last engine on the model, but not in its copies or pickles (the cache is big)."""

    engine: DecodeEngine | None = None

    def __deepcopy__(self, memo):
        return _EngineHolder()

    def __reduce__(self):
        return _EngineHolder, ()


def decode_engine(model, policy: DenoisePolicy, rows: int, max_length: int, device) -> DecodeEngine:
    """An engine for these settings: the model's previous one if it fits, else a new one.

    Building an engine allocates its cache and, on CUDA, captures its graph, which costs more than a short
    generation; repeated ``generate()`` calls of one shape reuse both, with the new settings copied in. Only the
    last engine is kept, so its cache is all the memory held between calls.
    """
    rule, sampling = policy.commit_rule(rows, device), policy.sampling(rows, device)
    candidates = verify_candidates(policy, rows, device)
    tree = verify_tree(policy, rows, device, candidates)
    guesses = verify_guesses(replace(policy, draft_tree=tree), rows, device, candidates)
    length = -(-max_length // ENGINE_LENGTH_STEP) * ENGINE_LENGTH_STEP
    weights = tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())  # moved or recast: rebuild
    key = (rows, length, policy.block_size, policy.confidence, tuple(policy.eos_token_ids), policy.pad_token_id,
           policy.use_cuda_graph, policy.compile_step, candidates, guesses, policy.candidate_width, tree,
           structure_of((rule, sampling)),
           hash(weights),
           DecodeEngine.grouped_sdpa, DecodeEngine.choose_tree)  # fmt: skip
    holder = model.__dict__.setdefault("_blockdiff_engine", _EngineHolder())
    engine = holder.engine
    if engine is not None and engine.key == key:
        for mine, new in zip(settings_of((engine.rule, engine.sampling)), settings_of((rule, sampling))):
            mine.copy_(new)
        engine.reset()
        return engine
    holder.engine = None  # free the old cache before allocating the new one
    engine = DecodeEngine(model, rows=rows, max_length=length, block_size=policy.block_size, rule=rule,
                          sampling=sampling, confidence=policy.confidence, eos_token_ids=policy.eos_token_ids,
                          pad_token_id=policy.pad_token_id, use_cuda_graph=policy.use_cuda_graph,
                          compile_step=policy.compile_step, candidates=candidates, guesses=guesses,
                          candidate_width=policy.candidate_width, tree=tree)  # fmt: skip
    engine.key = key
    holder.engine = engine
    return engine


def _filler(policy: DenoisePolicy) -> int:
    """What fills the gap before a shorter row's new tokens when the stopping criteria see the batch: the mask
    token, which is never text. Not the pad token: it is often the EOS token too (SmolLM2), whose text
    lm-evaluation-harness adds to every request's stop strings, so a row behind the others would read as stopped
    (empty answers in batches). Without a mask token (block size 1) rows advance in step: no gap to fill."""
    return policy.mask_token_id if policy.mask_token_id is not None else policy.pad_token_id


def _stopped_rows(criteria: StoppingCriteriaList, input_ids: torch.Tensor, generated: list[list[int]], fill: int):
    """Rows the stopping criteria end, asked once for the whole batch as transformers does (criteria may keep
    per-row state, e.g. lm-evaluation-harness's). Rows are at different lengths, so each row's new tokens are
    right-aligned after its prompt, ``fill`` (see :func:`_filler`) between: criteria look at the end of each
    sequence."""
    width = max(len(g) for g in generated)
    tail = torch.full((len(generated), width), fill, dtype=torch.long)
    for r, g in enumerate(generated):
        if g:
            tail[r, width - len(g) :] = torch.tensor(g, dtype=torch.long)
    stop = torch.as_tensor(criteria(torch.cat([input_ids, tail.to(input_ids.device)], dim=1), None)).reshape(-1)
    if stop.numel() == 1:  # one answer for the whole batch
        return range(len(generated)) if bool(stop) else []
    return stop.nonzero().squeeze(1).tolist()
