"""Benchmarks of the RMSuon family: cost (optimizer step, training step, state memory),
grokking (epochs to solve modular addition) and WT2-offline (CPU-sized Qwen3 perplexity).

    python -m benchmarks.run --setting quick            # `make bench-quick`: < 15 min, to runs/bench-quick/
    python -m benchmarks.run --setting full             # `make bench`: results/ + plots/ + BENCHMARKS.md
    python -m benchmarks.run --setting full --only cost
    python -m benchmarks.report --setting full          # regenerate BENCHMARKS.md and plots from the JSON

Every benchmark writes its raw data to ``<out>/results/<name>.json`` as soon as it finishes (and
keeps per-run results in a cache, so an interrupted run resumes); ``benchmarks.report`` turns the
JSON into the tables and PNG plots — both from the same recorded data.
"""
