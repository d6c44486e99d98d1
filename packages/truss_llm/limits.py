"""Baseten's published limits (docs.baseten.co, "Timeouts" and "Request size").

One place for them: the local runner enforces them as Baseten's edge does, and the model
keeps every request inside them (see `budget`). Tests compress them through settings.
"""

MB = 1000 * 1000
KiB = 1024

MAX_BODY_BYTES = 100 * MB            # the edge answers 413 past this
MAX_ASYNC_INPUT_BYTES = 256 * KiB    # an async_predict body
SYNC_TIMEOUT_S = 1200.0              # sync predict, then 504
WAKE_TIMEOUT_S = 1200.0
ASYNC_RUN_TIMEOUT_S = 3600.0         # one async attempt's run time
