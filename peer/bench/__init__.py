"""Benchmarks of the peer (measurements, never tests): ``python -m peer.bench <name> [--quick] [--json]``.

One module per benchmark (capture, propagation, throughput, ycsb, discovery, fanout), each with ``NAME``, ``HELP``,
``add_arguments``, ``run``, ``markdown`` and ``charts``; shared instruments in ``common``, results folder, Markdown
and plots in ``report``, generated peer types (trees, stars) in ``topology``, the command line in ``runner``.
"""

from peer.bench.runner import main

__all__ = ["main"]
