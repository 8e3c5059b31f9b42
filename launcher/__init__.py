"""The ``compactor`` command: starts the gateway, workers and notifier (``cli.py``) and supervises
the embedded default's process tree (``processes.py``).

It sits beside ``compactor/`` rather than inside it because it imports ``service`` and
``worker``; ``compactor/`` is the torch-free package both of those import, and imports neither.
"""
