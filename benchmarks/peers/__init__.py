"""The peers a user would pick instead, serving the same graph with the same server-side work.

Each runs in ``benchmarks/.peers-venv`` (``make bench`` builds it from ``requirements.txt``)
with the project root on ``PYTHONPATH``, and imports only :mod:`benchmarks.peers.common`,
which uses the service's own decoder and nothing else of the service.
"""
