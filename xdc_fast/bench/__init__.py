"""``xdc-fast bench``: speed of our kernels against what people would otherwise use, in one run.

Every contender sees the same data, the same thread count and the same timer; times are the best of
``repeats`` after one warm-up, and ratios are taken against ours measured in the same process. These
machines are shared, so compare ratios within one table, not absolute times across tables.
"""
