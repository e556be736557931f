"""The benchmark suite behind ``python -m vqkernels bench`` and ``benchmarks/``.

``cases``: what is timed (one module per op family, registered in
``cases.OP_MODULES``); ``runner``: how it is timed and judged against the
device's ceilings; ``report``: the table, the JSON file and the plot.
"""
