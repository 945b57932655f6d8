# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""Decoding methods: how a row of a decode step turns forwards into output (docs/design.md 2.5, 2.6).

Hub-portable: imports only torch and its sibling files.

Every busy slot of a :class:`~engine.DecodeEngine` decodes with one method. A method is a small class of four
parts, each acting only on its own rows (``mine``, a bool ``(rows,)`` mask) of the engine's per-row state:

- :meth:`~DecodingMethod.start`: the first block of a new request, from the prefill's token;
- :meth:`~DecodingMethod.feed`: what its rows put into the step's forward besides their block (candidate next
  blocks), and where a noisy-scope adapter acts;
- :meth:`~DecodingMethod.update`: after the forward, what it commits (denoised positions) or keeps (a verified
  prefix), its rows' next state, and their events for the host.

The engine runs all methods in one fixed-shape step (one CUDA graph), so a method is device operations on whole
tensors, masked to its rows: no host reads, no data-dependent shapes. The shipped methods:

- :class:`Denoising`: threshold (or fixed-steps) denoising of each block, then one causal commit forward;
- :class:`DraftVerify`: a drafting forward fills the block, the commit forward keeps what the causal model
  accepts (two forwards per block, lossless);
- :class:`VerifyAhead`: one forward verifies the block and drafts the next one in candidate blocks (lossless).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import VerifyScratch
from .policies import propose, speculative_accept

# A row's phase: between requests; denoising its block (bidirectional forward); committing it (causal forward);
# one-forward verify (a causal forward of the drafted block plus candidate next blocks).
IDLE, DENOISE, COMMIT, AHEAD = 0, 1, 2, 3


@dataclass
class StepInputs:
    """What a step feeds the forward, built by the methods for their rows."""

    ids: torch.Tensor  # (rows, queries): each row's block, then the scratch queries (candidate blocks)
    gate: torch.Tensor  # (rows, queries) bool: where a noisy-scope adapter acts (the positions being denoised)
    scratch: VerifyScratch | None  # what one-forward-verifying rows carry in the scratch slots


@dataclass
class StepOutput:
    """What the forward gave every row: hidden states of all queries; at each block position the proposal, its
    confidence and the distribution it came from (each predicting the next position)."""

    hidden: torch.Tensor
    tokens: torch.Tensor
    conf: torch.Tensor
    dist: torch.Tensor


class DecodingMethod:
    """One way a row decodes its blocks (see the module docstring)."""

    drafts = False  # a row's block holds drafts: output only once the causal model has verified them

    def start(self, engine, mine: torch.Tensor, first: torch.Tensor):
        """Start the first block of the new rows ``mine`` at ``first``. Returns ``(shown, finished)``: rows whose
        first block is output at once (a block of one token), and rows that ended there."""
        engine._start_block(mine, first)
        complete = mine & engine.filled.all(dim=1)
        return complete, engine._settle(complete)

    def feed(self, engine, mine: torch.Tensor, inputs: StepInputs):
        """Denoising rows: the adapter acts on their block."""
        denoising = mine & (engine.phase == DENOISE)
        inputs.gate |= engine._is_block & denoising.unsqueeze(1)

    def update(self, engine, mine: torch.Tensor, out: StepOutput):
        raise NotImplementedError

    def fill(self, engine, denoising, out: StepOutput) -> torch.Tensor:
        """Which open positions of the ``denoising`` rows' blocks this step commits (``(rows, block - 1)``)."""
        raise NotImplementedError

    def _denoise(self, engine, mine, out: StepOutput) -> torch.Tensor:
        """The denoising step of ``mine``'s denoising rows: position i predicts i + 1; commit what :meth:`fill`
        picks. Returns the rows whose block is complete now."""
        e = engine
        denoising = mine & (e.phase == DENOISE)
        commit = self.fill(e, denoising, out)
        e.block[:, 1:] = torch.where(commit, out.tokens[:, :-1], e.block[:, 1:])
        e.filled[:, 1:] |= commit
        e.committed_at[:, 1:] = torch.where(commit, e.forwards.unsqueeze(1), e.committed_at[:, 1:])
        e.steps += denoising
        e._close_after_eos(mine)
        return denoising & e.filled.all(dim=1)


class Denoising(DecodingMethod):
    """Threshold denoising: commit what the engine's :class:`~policies.CommitRule` picks until the block is full,
    then run it once causally (its keys become the committed cache; its last logit is the next first token)."""

    def fill(self, engine, denoising, out):
        open_ = ~engine.filled[:, 1:] & denoising.unsqueeze(1)
        return engine.rule.select(out.conf[:, :-1], out.tokens[:, :-1], open_, engine.steps) & open_

    def update(self, engine, mine, out):
        e = engine
        complete = self._denoise(e, mine, out)
        committing = mine & (e.phase == COMMIT)
        first = out.tokens.gather(1, (e.block_len - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        e.length += torch.where(committing, e.block_len, 0)
        e.generated += torch.where(committing, e.block_len, 0)
        e._start_block(committing, first)
        complete |= committing & e.filled.all(dim=1)  # a block of one position is complete at once
        finished = e._settle(complete)
        e._record_rows(mine, complete, finished, e.block_len, e.block, e.committed_at, e.block_len)


def accept(engine, tokens, dist, verifying, block=None, agree=None):
    """The ``verifying`` rows' decision on their drafted block, from the causal ``tokens`` (and ``dist``) of this
    forward: ``(keep, ends, next_first)``. ``keep``: block tokens kept (the first token plus the longest accepted
    draft prefix, cut after a kept EOS); ``ends``: a kept EOS; ``next_first``: the causal token after the kept part
    (sampling rows: the residual draw at a rejection, so tokens follow block-size-1 sampling). A greedy row that
    walked a tree gives its kept path as ``block``, the causal tokens along it and where it ``agree``\ s."""
    e = engine
    agree = e.block[:, 1:] == tokens[:, :-1] if agree is None else agree
    speculative = e._sampling and e.block_size > 1
    if speculative:
        accepted, residual = speculative_accept(dist[:, :-1], e.draft_dist[:, 1:], e.block[:, 1:], e.uniform[:, 1:],
                                                e.noise[:, : e.block_size - 1])  # fmt: skip
        agree = torch.where(e.sampling.do_sample.unsqueeze(1), accepted, agree)
    agree &= e._index[1:] < e.block_len.unsqueeze(1)
    keep = torch.where(verifying, agree.long().cumprod(dim=1).sum(dim=1) + 1, e.block_len)
    kept_eos = verifying.unsqueeze(1) & e._eos_at(e._index < keep.unsqueeze(1), block)
    ends = kept_eos.any(dim=1)
    keep = torch.where(ends, torch.where(kept_eos, e._index + 1, e.block_size).min(dim=1).values, keep)
    at = (keep - 1).clamp(min=0).unsqueeze(1)
    next_first = tokens.gather(1, at).squeeze(1)
    if speculative:
        rejected = verifying & e.sampling.do_sample & (keep < e.block_len)
        next_first = torch.where(rejected, residual.gather(1, at.clamp(max=e.block_size - 2)).squeeze(1), next_first)
    return keep, ends, next_first


def keep_verified(engine, verifying, out: StepOutput, path=None):
    """:func:`accept` the ``verifying`` rows' drafts and move them past what they keep. Returns ``(keep, ends,
    next_first, report)``; ``report`` is what the host sees of the verified block: its tokens, the kept length,
    the forward that committed each token, and the drafted length (the tokens past the kept ones were rejected).
    ``path``: a walked tree's ``(block, tokens, agree)`` (:meth:`VerifyAhead.walk`)."""
    e = engine
    block, tokens, agree = path or (e.block, out.tokens, None)
    keep, ends, first = accept(e, tokens, out.dist, verifying, block, agree)
    report = (block.clone(), keep, torch.where(e._index > 0, e.forwards.unsqueeze(1), e.committed_at),
              e.block_len.clone())  # fmt: skip
    e.length += torch.where(verifying, keep, 0)
    e.generated += torch.where(verifying, keep, 0)
    e.ended |= ends
    return keep, ends, first, report


class DraftVerify(DecodingMethod):
    """Two forwards per block: a bidirectional forward drafts every open position at once; the causal commit
    forward keeps the longest prefix it agrees with plus its own next token. The rest of the written cache lies
    past the row's new length and is overwritten later, never a valid key."""

    drafts = True

    def fill(self, engine, denoising, out):
        commit = ~engine.filled[:, 1:] & denoising.unsqueeze(1)
        if engine._sampling:  # a sampled draft is accepted against the distribution it came from
            engine.draft_dist[:, 1:] = torch.where(commit.unsqueeze(-1), out.dist[:, :-1], engine.draft_dist[:, 1:])
        return commit

    def update(self, engine, mine, out):
        e = engine
        complete = self._denoise(e, mine, out)
        verified = mine & (e.phase == COMMIT)
        keep, ends, first, report = keep_verified(e, verified, out)
        done = verified & (ends | (e.generated >= e.max_new))
        e._start_block(verified & ~done, first)
        finished = e._settle(complete)  # (only a block of one token completes without being verified)
        e.phase.masked_fill_(done, IDLE)
        pick = verified.unsqueeze(1)
        e._record_rows(mine, (complete & finished) | verified, (complete & finished) | done,
                       torch.where(verified, report[1], e.block_len), torch.where(pick, report[0], e.block),
                       torch.where(pick, report[2], e.committed_at), torch.where(verified, report[3], e.block_len))  # fmt: skip


class VerifyAhead(DecodingMethod):
    """One forward per block (docs/design.md 2.6): the row's drafted block, causally, with the rest of its tree of
    drafts (:mod:`draft_tree`) in scratch slots, then its candidate next blocks. Candidate ``c`` is ``[its anchor's
    token, MASK ...]`` (in guessing group ``g``, the first mask replaced by the draft's next choice there); after the
    acceptance the candidate anchored nearest above the last kept token gives the next block's drafts."""

    drafts = True

    def start(self, engine, mine, first):
        """The first block is the first token alone, verified (and drafted after) by the first step."""
        e = engine
        e._start_block(mine, first, size=torch.ones_like(e.row_block_size))
        finished = e._settle(mine)
        e.phase.copy_(torch.where(mine & ~finished, AHEAD, e.phase))
        return finished, finished

    @staticmethod
    def tree_tokens(e) -> torch.Tensor:
        """``(rows, tree slots)``: every tree node's token, its position's choice of its rank."""
        choices = torch.cat([e.block.unsqueeze(-1), e.alternatives[:, : e.block_size]], dim=-1)
        return choices[:, e._tree["depth"], e._tree["rank"]]

    @staticmethod
    def guess_tokens(e) -> torch.Tensor:
        """``(rows, candidates, guesses)``: each candidate's guesses of the causal token after its anchor."""
        t = e._tree
        return e.alternatives[:, (t["depth"][t["anchors"]] + 1).unsqueeze(1), t["guess_rank"] - 1]

    @staticmethod
    def carried(e) -> torch.Tensor:
        """``(rows, tree slots)``: whether each pool path is in the row's tree this step (the chain always is)."""
        carried = e._tree["on_chain"].expand(e.rows, -1).clone()
        return carried.scatter_(1, e.carried, True)

    @staticmethod
    def walks(e, ahead) -> torch.Tensor:
        """Rows that walk their tree: greedy ones (a sampling row checks its chain by speculative sampling)."""
        return ahead & ~e.sampling.do_sample

    def feed(self, engine, mine, inputs):
        e, t, b = engine, engine._tree, engine.block_size
        ahead = mine & (e.phase == AHEAD)
        walks = self.walks(e, ahead)
        tokens = self.tree_tokens(e)
        if e.nodes:  # the tree this step: the pool's likeliest paths under the drafts' probabilities (or all of it)
            e.carried.copy_(e.tree.choose(t, e.draft_logp, e.block_len))
            inputs.ids[:, b : b + e.nodes] = tokens.gather(1, e.carried)
        ids = e.block.new_full((e.rows, e.groups, e.candidates, e.width), e.mask_token_id)
        ids[:, :, :, 0] = tokens[:, t["anchors"]].unsqueeze(1)
        if e.guesses:
            ids[:, 1:, :, 1] = self.guess_tokens(e).transpose(1, 2)
        inputs.ids[:, b + e.nodes :] = ids.flatten(1)
        copies = ahead.unsqueeze(1) & (e._index[: e.candidates] < e.row_candidates.unsqueeze(1))
        # an anchor off the chain exists in walks only, where the row carries it
        copies &= (t["anchors"] < b) | (walks.unsqueeze(1) & self.carried(e)[:, t["anchors"]])
        scratch = inputs.scratch
        scratch.ahead |= ahead
        scratch.nodes |= walks.unsqueeze(1)
        scratch.copies |= copies.repeat(1, e.groups)
        inputs.gate |= e._is_copy & ahead.unsqueeze(1)

    def walk(self, e, ahead, out):
        """The path each row keeps of its tree: from the first token down, the child whose token is its parent's
        causal token. Returns ``(path, (block, tokens, agree))``: the tree slot at each depth (past the path's end,
        the chain's, whose drafts count as rejected), its tokens, the causal tokens there, and ``agree`` for
        :func:`accept`."""
        t, b = e._tree, e.block_size
        tokens = self.tree_tokens(e)
        causal = out.tokens
        if e.nodes:
            produced = e.generated.unsqueeze(1) + t["depth"][e.carried] + 1  # the token index each node predicts
            node_causal, _ = propose(e.model.logits_from_hidden(out.hidden[:, b : b + e.nodes]), e.sampling,
                                     e.measure, e.mask_token_id, e.eos, produced < e.min_new.unsqueeze(1))  # fmt: skip
            pool = causal.new_full((e.rows, tokens.shape[1] - b), -1)  # (a path not carried: no causal token)
            causal = torch.cat([causal, pool.scatter(1, e.carried - b, node_causal)], dim=1)
        valid = (t["depth"] < e.block_len.unsqueeze(1)) & (t["on_chain"] | self.walks(e, ahead).unsqueeze(1))
        valid &= self.carried(e)
        match = valid & (tokens == causal[:, t["parent"]])
        match[:, 0] = True
        kept = match[:, t["path_of"]].all(dim=-1)  # (exactly one path: siblings hold distinct choices)
        end = torch.where(kept, t["depth"] + 1, 0).argmax(dim=1)
        depth = t["depth"][end].unsqueeze(1)
        path = torch.where(e._index > depth, e._index, t["path_of"][end])
        return path, (tokens.gather(1, path), causal.gather(1, path), e._index[1:] <= depth)

    def update(self, engine, mine, out):
        e = engine
        ahead = mine & (e.phase == AHEAD)
        path, kept = self.walk(e, ahead, out)
        if e.nodes:  # the kept nodes off the chain: their keys and values go to their positions' slots
            target = e.scratch + e.length.unsqueeze(1) + e._index
            nodes = torch.arange(e.nodes, device=e.device).expand(e.rows, -1)
            slot_of = e.carried.new_zeros(e.rows, e._tree["depth"].shape[0]).scatter(1, e.carried, nodes)  # scratch
            e.cache.move(torch.where(path >= e.block_size, slot_of.gather(1, path), target), target)
        keep, ends, first, report = keep_verified(e, ahead, out, kept)
        self._draft_next(e, mine, ahead, out.hidden, keep, ends, first, report, path)

    def _draft_next(self, e, mine, ahead, hidden, keep, ends, first, report, path):
        """Each row's next block is ``[first, drafts]``, the drafts read from the candidate anchored at the last
        kept token. A row whose kept path ends where no candidate is anchored reads the nearest one above it,
        further along (any draft is lossless; only its acceptance differs). A row also ends here when ``first`` is its last
        token (an EOS, or the last of its budget): it is output now, without a forward."""
        b, w = e.block_size, e.width
        left = e.max_new - e.generated  # after this step's kept tokens
        stop = torch.isin(first, e.eos) & (e.generated >= e.min_new)  # (propose forbids it before)
        last = ahead & ~ends & (left > 0) & (stop | (left == 1))  # ``first`` is the row's last token
        done = ahead & (ends | (left <= 0) | last)
        t = e._tree
        end = path.gather(1, (keep - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # the last kept token's tree slot
        cand = t["nearest"][end, e.row_candidates].clamp(min=0)
        offset = t["depth"][end] - t["depth"][t["anchors"][cand]]
        count = torch.minimum(torch.minimum(e.row_block_size - 1, w - 1 - offset), left - 1).clamp(min=0)
        count = torch.where(e.row_candidates > 0, count, 0)
        if e.guesses:  # the guessing copy whose guess is the token after its anchor (the causal one, or the path's)
            guessed = self.guess_tokens(e).gather(1, cand.view(-1, 1, 1).expand(-1, 1, e.guesses)).squeeze(1)
            after_at = t["depth"][t["anchors"][cand]] + 1
            after = torch.where(offset > 0, report[0].gather(1, after_at.clamp(max=b - 1).unsqueeze(1)).squeeze(1),
                                first)  # fmt: skip
            hit = (guessed == after.unsqueeze(1)) & (after_at < e.block_len).unsqueeze(1)
            group = torch.where(hit.any(dim=1), hit.int().argmax(dim=1) + 1, 0)  # (the choices are distinct)
            cand = cand + group * e.candidates
        where = (b + e.nodes + cand * w + offset + 1).unsqueeze(1) + e._index[:-1]  # position j predicts j + 1
        picked = hidden.gather(1, where.clamp(max=e.queries - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        produced = (e.generated + 1).unsqueeze(1) + e._index[:-1]  # token index of the new block's drafts
        noise = e.noise[:, b:] if e._sampling else None
        drafts, _, dist = propose(e.model.logits_from_hidden(picked), e.sampling, e.measure, e.mask_token_id, e.eos,
                                  produced < e.min_new.unsqueeze(1), noise, with_dist=True)  # fmt: skip
        go_on = ahead & ~done
        use = e._index[:-1] < count.unsqueeze(1)
        block = torch.cat([first.unsqueeze(1), torch.where(use, drafts, e.pad_token_id)], dim=1)
        e.block.copy_(torch.where(go_on.unsqueeze(1), block, e.block))
        if e._sampling:
            e.draft_dist[:, 1:] = torch.where((go_on.unsqueeze(1) & use).unsqueeze(-1), dist, e.draft_dist[:, 1:])
        if e.guesses or e.nodes:
            top = dist.topk(1 + e.alternatives.shape[-1], dim=-1)
            e.alternatives[:, 1:-1] = torch.where(go_on.view(-1, 1, 1), top.indices[..., 1:], e.alternatives[:, 1:-1])
            e.alternatives[:, -1] = e.mask_token_id  # (after the block: no guess)
            if e.tree.chosen:  # what the next step's tree is chosen by
                e.draft_logp[:, 1:-1] = torch.where(go_on.view(-1, 1, 1), top.values.log(), e.draft_logp[:, 1:-1])
        at = torch.where(e._index == 0, e.forwards.unsqueeze(1), -1)
        e.committed_at.copy_(torch.where(go_on.unsqueeze(1), at, e.committed_at))
        e.block_len.copy_(torch.where(go_on, 1 + count, torch.where(done, 0, e.block_len)))
        e.filled.masked_fill_(go_on.unsqueeze(1), True)  # a draft fills its positions (the check is next step)
        e.phase.masked_fill_(done, IDLE)
        # The host sees the kept tokens (and ``first`` where it is the last); the rest of the draft was rejected.
        tokens, kept, at, drafted = report
        end = keep.unsqueeze(1)
        tokens = torch.nn.functional.pad(tokens, (0, 1), value=e.pad_token_id)
        tokens = torch.where(last.unsqueeze(1), tokens.scatter(1, end, first.unsqueeze(1)), tokens)
        at = torch.nn.functional.pad(at, (0, 1), value=-1).scatter(1, end, e.forwards.unsqueeze(1))
        e._record_rows(mine, ahead, done, kept + last, tokens, at, drafted)
