"""``sherry compare``: Sherry against the 2-bit and 1.67-bit baselines, in size, speed and accuracy.

One model is exported to every format with the same LM head (``<output>/models/<format>/``), then:

- size: file bytes and bits per weight, with and without scales, from the packed initializers
  (``accounting.py``);
- speed: prefill and decode tokens/s per thread count, formats interleaved across repetitions,
  the profiler's op-type breakdown of a decode step, and the machine's memory bandwidth measured in
  the same run (``speed.py``);
- accuracy: held-out perplexity and zero-shot ARC-Easy/Challenge, HellaSwag, PIQA and WinoGrande
  scored through the exported models in onnxruntime (``accuracy.py``, ``tasks.py``), optionally next
  to the PyTorch model and other checkpoints (the dense-ternary and full-precision runs of a QAT
  experiment).

The report goes to ``<output>/report.md``, ``results.json``, ``latency_vs_bpw.png`` and
``accuracy_vs_bpw.png``. Full-run commands and their tables: ``docs/results.md``.
"""
