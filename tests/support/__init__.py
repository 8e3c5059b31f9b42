"""Helpers shared by the tests and the benches, in one place.

- ``models``: the tiny seeded CNN, the digits dataset as tensors, training and top-1.
- ``jobs``: job specs, uploads and jobs put straight into a store, real worker processes,
  ``wait_for``, ``free_port``.
- ``gateway``: API keys, the small upload files, uvicorn in a thread, what storage holds.
- ``live_server``: a real gateway whose worker's side the test plays through the store.
- ``live_gateway``: raw-socket HTTP against a running gateway (memory and abuse tests).
- ``hostile_models``: real TorchScript programs that attack the worker.
- ``fixtures``: the pytest fixtures every directory may use (registered in tests/conftest.py).
"""
