"""The benchmark suite behind ``python -m vqkernels bench`` and ``benchmarks/``.

``cases``: what is timed (one module per op family, registered in
``cases.OP_MODULES``); ``runner``: how it is timed and judged against the
device's ``ceilings`` (the GPU table, start-up measurements, CPU cache
levels); ``report``: the table, the JSON file and the plot.

For ``scripts/gpu_check.sh``: ``summary`` writes its summary.md from the
``evidence`` it left (steps, junit XML, logs, JSON), judged by the issue
``targets``; ``placeholders`` stand in for files a step did not write.
"""
