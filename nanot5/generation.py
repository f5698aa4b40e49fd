"""Decoding for nanot5's `T5`: greedy, sampling and beam search over one preallocated KV cache.

The semantics are those of Hugging Face transformers' `generate` (transformers 5:
generation/utils.py `_sample` and `_beam_search`, generation/logits_process.py), so that in fp32
the tokens equal HF's for the same weights and arguments (tests/test_generation.py):

- scores: greedy and sampling start from the fp32 logits; beam search from their log-softmax.
  Processors run in HF's order: no-repeat-n-gram ban, EOS suppression below `min_new_tokens`,
  then (sampling only) temperature, top-k, top-p.
- beam search (vectorised over the batch): each step keeps the 2 * num_beams best continuations
  of all beams by summed log-probability; the best num_beams of those that did not just emit EOS
  keep running, and those among the first num_beams that emitted EOS (or reached max_new_tokens)
  compete for the num_beams finished slots with score sum_logprob / len ** length_penalty, where
  len counts the new tokens, EOS included (as transformers 5 does; older versions also counted
  the decoder start token). A batch item stops taking hypotheses when it cannot improve
  (`early_stopping=False`: the best running beam, scored at its current length, is not above the
  worst finished one; `"never"`: the same test at max_new_tokens when length_penalty > 0; `True`:
  as soon as num_beams hypotheses are finished). Dead branches are excluded by adding -1e9, as HF
  does, so that ties resolve the same way.
- sampling draws from `generator` (torch's global RNG when None): a seeded generator reproduces
  its tokens and, as HF's kernels are the same, gives HF's tokens after `torch.manual_seed(seed)`.

Differences from HF, by design: the result holds only the new tokens (HF prepends the decoder
start token), and positions after a row's EOS hold pad_token_id (HF's beam search fills them with
EOS, since its fill value `pad or eos` takes eos when pad_token_id is 0). Both are
(B * num_return_sequences, L) with L the longest returned sequence. Default top_k is 0 (no top-k filter; HF's default is 50: pass
top_k=50 for HF's default sampling).

Speed: the encoder runs once per input row; with beams, the cross-attention keys/values are
computed once per input row and shared by its beams (each batch item's beams attend as one
(num_beams, C) query block), and only the used prefix of the self-attention cache is reordered.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from nanot5.model import T5, padding_bias

NEG = -1.0e9  # what HF adds to scores of candidates that must not be chosen


# ----------------------------------------------------------------------------- arguments
def check_generate_args(model: T5, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                        max_new_tokens: int, eos_token_id: int | None, num_beams: int, length_penalty: float,
                        early_stopping: bool | str, no_repeat_ngram_size: int, do_sample: bool,
                        temperature: float, top_k: int, top_p: float, min_new_tokens: int,
                        num_return_sequences: int, generator: torch.Generator | None) -> None:
    """Raise a ValueError naming the first bad argument of `T5.generate`."""
    def is_int(x) -> bool:  # Python or NumPy integers, not bools
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def is_real(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"generate: input_ids must be a 2-D (batch, length) tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"generate: input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    vocab = model.config.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"generate: input_ids must be in [0, vocab_size={vocab}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"generate: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"generate: min_new_tokens must be an int in [0, max_new_tokens={max_new_tokens}], "
                         f"got {min_new_tokens!r}")
    if eos_token_id is not None and not is_int(eos_token_id):
        raise ValueError(f"generate: eos_token_id must be an int (negative: never stop at EOS) or None, "
                         f"got {eos_token_id!r}")
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"generate: num_beams must be an int >= 1, got {num_beams!r}")
    if not is_real(length_penalty) or not math.isfinite(length_penalty):
        raise ValueError(f"generate: length_penalty must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never") or not isinstance(early_stopping, (bool, str)):
        raise ValueError(f"generate: early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not is_int(num_return_sequences) or num_return_sequences < 1:
        raise ValueError(f"generate: num_return_sequences must be an int >= 1, got {num_return_sequences!r}")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError(f"generate: greedy decoding returns one sequence per input, got num_return_sequences="
                         f"{num_return_sequences} (use num_beams >= it, or do_sample=True)")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"generate: num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}")
    if not is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        raise ValueError(f"generate: no_repeat_ngram_size must be an int >= 0 (0: off), got {no_repeat_ngram_size!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"generate: do_sample must be True or False, got {do_sample!r}")
    if not is_real(temperature) or not 0.0 < temperature < math.inf:
        raise ValueError(f"generate: temperature must be a finite number > 0 (for greedy decoding use "
                         f"do_sample=False), got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1] (1: off), got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generate: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != input_ids.device.type:
            raise ValueError(f"generate: generator is on {generator.device} but input_ids on {input_ids.device}")


# ----------------------------------------------------------------------------- scores
def banned_ngram_mask(history: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor | None:
    """Tokens that would repeat an n-gram of `history`: (N, V) bool, or None when nothing is banned.

    history: (N, L) decoder inputs so far (the start token included, as HF's no-repeat-n-gram
    processor sees them). The next token t is banned when history[-(n-1):] + [t] already occurs.
    """
    N, L = history.shape
    if n <= 0 or L < n:
        return None
    starts = L - n + 1  # n-grams fully inside the history start at 0 .. L-n
    suffix = history[:, L - n + 1:]  # (N, n-1): the n-1 tokens the next n-gram begins with
    same = torch.ones(N, starts, dtype=torch.bool, device=history.device)
    for j in range(n - 1):  # n-gram at s matches when history[s + j] == suffix[j] for every j < n-1
        same &= history[:, j:j + starts] == suffix[:, j:j + 1]
    completes = history[:, n - 1:]  # (N, starts): the last token of the n-gram starting at s
    banned = torch.zeros(N, vocab_size + 1, dtype=torch.bool, device=history.device)
    # non-matching n-grams write to a spare column V, dropped below
    banned.scatter_(1, torch.where(same, completes, vocab_size), True)
    return banned[:, :vocab_size]


def top_k_filter(scores: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Scores below the k-th largest of each row set to -inf (ties with it kept); k=0 keeps all."""
    if k <= 0:
        return scores
    k = min(max(k, min_keep), scores.shape[-1])
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (N, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020, arXiv 1904.09751): keep the most probable tokens whose
    probabilities sum to >= p, and at least `min_keep`; the rest set to -inf.

    As HF's TopPLogitsWarper: a token is dropped when the total probability of it and every less
    probable token is <= 1 - p (summed in ascending order, so the kept set equals HF's bit for bit).
    """
    if p >= 1.0:
        return scores
    ascending, order = scores.sort(dim=-1)  # (N, V), least probable first
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = mass_up_to <= 1.0 - p
    drop[..., -min_keep:] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def process_scores(scores: torch.Tensor, history: torch.Tensor, step: int, eos: int, opts: dict,
                   min_keep: int) -> torch.Tensor:
    """HF's logits-processor chain for one step: (N, V) fp32 scores -> (N, V).

    history: (N, 1 + step) decoder inputs so far; step: tokens generated so far.
    """
    ban = banned_ngram_mask(history, opts["no_repeat_ngram_size"], scores.shape[-1])
    if ban is not None:
        scores = scores.masked_fill(ban, float("-inf"))
    if step < opts["min_new_tokens"] and eos >= 0:
        scores = scores.clone()
        scores[:, eos] = float("-inf")
    if opts["do_sample"]:
        if opts["temperature"] != 1.0:
            scores = scores / opts["temperature"]
        scores = top_k_filter(scores, opts["top_k"], min_keep)
        scores = top_p_filter(scores, opts["top_p"], min_keep)
    return scores


# ----------------------------------------------------------------------------- decoder state
class DecoderState:
    """Caches and constants of one generate call: runs one decoder step for all rows.

    rows = batch * beams; the row of beam j of input i is i * beams + j. The self-attention cache
    (the `Attention` cache dict: preallocated (rows, H, max_len, D) k/v and a length) holds one row
    per beam. Cross-attention k/v are computed once per input row; with beams > 1 they stay per
    input row and a step attends with each input's beams as a (beams, C) block of queries, which is
    exact because cross-attention has no position bias.
    """

    def __init__(self, model: T5, memory: torch.Tensor, memory_mask: torch.Tensor | None, beams: int,
                 max_len: int):
        self.model, self.beams = model, beams
        self.memory = memory  # (B, S, C)
        self.cross_mask = padding_bias(memory_mask)  # (B, 1, 1, S) additive, or None
        self.caches = [{"self": {"max_len": max_len}, "cross": {}} for _ in model.decoder.blocks]
        # position bias of every (query, key) pair, computed once; step t uses row t, keys 0..t
        self.bias = model.decoder.rel_bias(max_len, max_len)  # (1, H, L, L)

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """tokens: (rows, 1), the inputs at position t -> logits of position t + 1: (rows, V)."""
        dec = self.model.decoder
        x = dec.drop(self.model.shared(tokens))  # (rows, 1, C)
        bias = self.bias[:, :, t:t + 1, :t + 1]
        for block, cache in zip(dec.blocks, self.caches):
            if self.beams == 1:
                x = block(x, bias, None, self.memory, self.cross_mask, cache=cache)
            else:
                x = _beam_block_step(block, x, bias, self.memory, self.cross_mask, cache, self.beams)
        return self.model.lm_logits(dec.final_norm(x))[:, -1]

    def reorder(self, rows: torch.Tensor, t: int) -> None:
        """Beam search: row r of the self-attention caches becomes row rows[r] (positions 0..t)."""
        for cache in self.caches:
            c = cache["self"]
            for key in ("k", "v"):
                used = c[key][:, :, :t + 1]  # (rows, H, t+1, D) view into the preallocated buffer
                used.copy_(used.index_select(0, rows))


def _beam_block_step(block, x, bias, memory, cross_mask, cache, beams: int) -> torch.Tensor:
    """`Block.forward` for one decoding step of beams: x (B * beams, 1, C) -> (B * beams, 1, C).

    Identical to `block(x, bias, None, memory, cross_mask, cache=cache)` with memory repeated per
    beam, but the cross-attention runs as (B, beams, C) queries against each input's k/v: no copy
    of the encoder k/v per beam, and a quarter of the memory traffic at 4 beams (the t5-v1_1-small
    beam bench runs ~15% faster). Mirrors `Block.forward` sublayer by sublayer: keep the two in
    step (tests/test_generation.py checks they agree).
    """
    x = x + block.drop(block.attn(block.attn_norm(x), bias, None, cache=cache["self"]))
    q_in = block.cross_norm(x).view(-1, beams, x.shape[-1])  # (B, beams, C)
    x = x + block.drop(block.cross(q_in, None, cross_mask, memory, cache=cache["cross"]).view_as(x))
    return x + block.drop(block.ffn(block.ffn_norm(x)))


# ----------------------------------------------------------------------------- decoding
@torch.no_grad()
def generate(model: T5, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 128, eos_token_id: int | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_new_tokens: int = 0, num_return_sequences: int = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Decode `input_ids` (B, S) -> (B * num_return_sequences, L) new tokens, L <= max_new_tokens;
    see `T5.generate`."""
    check_generate_args(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                        no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens,
                        num_return_sequences=num_return_sequences, generator=generator)
    max_new_tokens, num_beams, num_return_sequences = int(max_new_tokens), int(num_beams), int(num_return_sequences)
    opts = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=float(length_penalty),
                early_stopping=early_stopping, no_repeat_ngram_size=int(no_repeat_ngram_size), do_sample=do_sample,
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                min_new_tokens=int(min_new_tokens), num_return_sequences=num_return_sequences, generator=generator)
    eos = int(model.config.eos_token_id if eos_token_id is None else eos_token_id)
    B = input_ids.shape[0]
    if max_new_tokens == 0 or B == 0:
        return input_ids.new_zeros((B * num_return_sequences, 0), dtype=torch.long)
    memory = model.encode(input_ids, attention_mask)  # (B, S, C)
    if num_beams == 1 and num_return_sequences > 1:  # independent samples: each input row repeated
        B, memory = B * num_return_sequences, memory.repeat_interleave(num_return_sequences, 0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, 0)
    state = DecoderState(model, memory, attention_mask, num_beams, max_new_tokens)
    if num_beams == 1:
        return _greedy_or_sample(model, state, B, eos, opts)
    return _beam_search(model, state, B, eos, opts)


def _greedy_or_sample(model: T5, state: DecoderState, B: int, eos: int, opts: dict) -> torch.Tensor:
    """One token per row and step (argmax, or a draw from the processed distribution); rows that
    emitted EOS get pad_token_id; stops when every row has emitted EOS."""
    cfg, n = model.config, opts["max_new_tokens"]
    device = state.memory.device
    plain = not opts["do_sample"] and opts["no_repeat_ngram_size"] == 0 and opts["min_new_tokens"] == 0
    seq = torch.full((B, 1 + n), cfg.pad_token_id, dtype=torch.long, device=device)  # start token, new tokens
    seq[:, 0] = cfg.decoder_start_token_id
    done = torch.zeros(B, 1, dtype=torch.bool, device=device)
    for t in range(n):
        logits = state.step(seq[:, t:t + 1], t)  # (B, V)
        if plain:  # today's greedy loop: argmax of the raw logits
            token = logits.argmax(-1, keepdim=True)
        else:
            scores = process_scores(logits.float(), seq[:, :t + 1], t, eos, opts, min_keep=1)
            if opts["do_sample"]:  # every row draws, finished or not, so the stream matches HF's
                token = torch.multinomial(scores.softmax(-1), 1, generator=opts["generator"])
            else:
                token = scores.argmax(-1, keepdim=True)
        token = token.masked_fill_(done, cfg.pad_token_id)  # (B, 1)
        seq[:, t + 1:t + 2] = token
        done |= token == eos
        if bool(done.all()):
            return seq[:, 1:t + 2]
    return seq[:, 1:]


def _beam_search(model: T5, state: DecoderState, B: int, eos: int, opts: dict) -> torch.Tensor:
    """Beam search (or beam sampling with do_sample) with HF's hypothesis bookkeeping; see the
    module docstring. Returns each input's num_return_sequences best finished hypotheses, best
    first, pad after EOS."""
    cfg, n, nb = model.config, opts["max_new_tokens"], opts["num_beams"]
    lp, early = opts["length_penalty"], opts["early_stopping"]
    device = state.memory.device
    K = 2 * nb  # candidates per input and step: at most nb of them end in EOS, so nb can continue
    rows_of_input = torch.arange(B, device=device)[:, None] * nb  # (B, 1) first row of each input
    is_top_nb = torch.arange(K, device=device) < nb  # (K,) only these may become finished hypotheses

    # running beams: tokens (start token, then new ones), summed log-probs
    run_seq = torch.full((B, nb, 1 + n), cfg.pad_token_id, dtype=torch.long, device=device)
    run_seq[:, :, 0] = cfg.decoder_start_token_id
    run_score = torch.zeros(B, nb, device=device)
    run_score[:, 1:] = NEG  # all beams start equal: only the first one may expand at step 0
    # finished hypotheses: num_beams slots per input, best first
    fin_seq = run_seq.clone()
    fin_score = torch.full((B, nb), NEG, device=device)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=device)  # slot holds a real hypothesis
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)

    for t in range(n):
        logits = state.step(run_seq[:, :, t].reshape(B * nb, 1), t)  # (B*nb, V)
        V = logits.shape[-1]
        logp = process_scores(F.log_softmax(logits.float(), dim=-1), run_seq[:, :, :t + 1].flatten(0, 1),
                              t, eos, opts, min_keep=2)
        total = (logp.view(B, nb, V) + run_score[:, :, None]).view(B, nb * V)
        if opts["do_sample"]:  # beam sampling: K draws without replacement, then best first
            pick = torch.multinomial(total.softmax(-1), K, generator=opts["generator"])  # (B, K)
            cand_score, order = total.gather(1, pick).sort(dim=-1, descending=True)
            pick = pick.gather(1, order)
        else:
            cand_score, pick = total.topk(K, dim=-1)  # (B, K), best first
        cand_beam, cand_tok = pick // V, pick % V
        cand_seq = run_seq.gather(1, cand_beam[:, :, None].expand(-1, -1, 1 + n))  # (B, K, 1+n)
        cand_seq[:, :, t + 1] = cand_tok
        ends = cand_tok == eos if t + 1 < n else torch.ones_like(cand_tok, dtype=torch.bool)  # (B, K)

        # the best nb candidates that did not just end keep running
        cont_score = cand_score + ends.float() * NEG
        keep = cont_score.topk(nb, dim=-1).indices  # (B, nb)
        run_seq = cand_seq.gather(1, keep[:, :, None].expand(-1, -1, 1 + n))
        run_score = cont_score.gather(1, keep)
        src_beam = cand_beam.gather(1, keep)  # (B, nb) beam each new running beam extends

        # candidates among the first nb that ended compete for the finished slots
        new_score = cand_score / ((t + 1) ** lp)
        if early is True:  # a full set of finished hypotheses takes no more
            new_score = new_score + fin_done.all(1, keepdim=True).float() * NEG
        new_score = new_score + (~improvable).float() * NEG
        ended_top = ends & is_top_nb
        new_score = new_score + (~ended_top) * NEG
        best = torch.cat([fin_score, new_score], 1).topk(nb, dim=-1).indices  # (B, nb)
        fin_seq = torch.cat([fin_seq, cand_seq], 1).gather(1, best[:, :, None].expand(-1, -1, 1 + n))
        fin_score = torch.cat([fin_score, new_score], 1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(cand_tok, t + 1)], 1).gather(1, best)
        fin_done = torch.cat([fin_done, ended_top], 1).gather(1, best)

        if t + 1 < n:
            state.reorder((rows_of_input + src_beam).flatten(), t)
        # can the best running beam still beat the worst finished hypothesis?
        best_len = n if (early == "never" and lp > 0.0) else t + 1
        best_possible = run_score[:, :1] / (best_len ** lp)  # (B, 1)
        worst_fin = torch.where(fin_done, fin_score.min(1, keepdim=True).values, NEG)  # (B, nb)
        improvable = improvable & (best_possible > worst_fin).any(-1, keepdim=True)
        go = improvable.any() & ~(fin_done.all() & (early is True)) & ~ends.all()
        if not bool(go):
            break

    r = opts["num_return_sequences"]
    length = int(fin_len[:, :r].max())
    return fin_seq[:, :r, 1:1 + length].flatten(0, 1)  # (B * r, length), input i's best at row i * r
