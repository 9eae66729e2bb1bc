"""Speculative decoding inside the paged engine's continuous batching (issue 33).

One job a module:

* ``config.py``: :class:`SpeculativeConfig`, the one validated config (vLLM's names);
* ``proposer.py``: the interface every proposer has (token ids in, drafted token ids out);
* ``ngram.py``: prompt lookup (draft the continuation of the longest recent match in the row's own tokens);
* ``draft.py``: a small draft model with the target's tokenizer, on its own paged KV;
* ``verify.py``: what one verify step reads back: the accepted prefix of each row's draft;
* ``controller.py``: per row and per step, K or no speculation, from measured acceptance, step cost and
  drafting cost, checked against what its plans then deliver.

Every proposer drafts a point mass (one token a position, no distribution), so verification is
Leviathan et al.'s rejection sampling with q = δ(d): the drafted token d is accepted with
probability p(d) (p: the row's target distribution after all its filters), and on rejection the
token comes from (p - q)+ normalized, i.e. p without d. Sampling x ~ p and accepting d iff x == d is
that same law (P(d) = p(d); P(x) = p(x) for x != d), which is how ``paged.py`` runs it: every
position is sampled by the row's own sampler (greedy rows: argmax) and compared with the draft.
"""
