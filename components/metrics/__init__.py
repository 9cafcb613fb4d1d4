"""Evaluation metrics as the papers' public code computes them, and their tables.

* :mod:`.text` — BLEU-1, ROUGE-1, METEOR and BERTScore F1 per sample
  (:class:`~.text.TextMetricSuite`); :mod:`.bertscore` holds the BERTScore model handling.
* :mod:`.modules` — the same metrics as ``evaluate`` modules loaded from local files.
* :mod:`.language_data` — installs/checks WordNet 3.0 and punkt_tab for METEOR
  (``python -m components.metrics.language_data install``).
* :mod:`.vqa`, :mod:`.diagnosis`, :mod:`.retrieval` — task metrics;
  :mod:`.aggregate` — per-question-type, macro and micro averages.
* :mod:`.results` — the results JSON builders; :mod:`.tables` — its schema, paper-style
  Markdown/CSV tables and PNG charts.

Submodules are imported on use so that ``import components.metrics`` stays light.
"""
