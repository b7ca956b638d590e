"""Query loading for SAMI: HH-RLHF first human turns, TL;DR posts, generic jsonl and bundled examples."""
