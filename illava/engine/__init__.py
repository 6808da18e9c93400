"""The model-agnostic merging engine (see `illava.adapters.base` for what a family provides).

* `vision` -- merges inside vision blocks: segments, units, window/segment boundaries rebuilt after
  a merge, placement order restored;
* `llm` -- placing kept features, merges after decoder layers at prefill, per-sample re-packing and
  masks, per-layer KV caches, positions gathered from the unmerged sequence, decoding;
* `capture` -- queries and keys taken from the attention call a block makes anyway;
* `model` -- applying all of it to a model (class swap) and removing it.
"""
