"""Compactor's compression core: a plain Python library (no HTTP, no Celery).

    from worker.compression import compress
    result = compress(model, spec, data, progress=callback)

The pipeline is load → score → prune → fine-tune → quantize → evaluate →
benchmark → export; see ``pipeline.py``.
"""
