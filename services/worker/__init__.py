"""The worker contract the pools and the router share.

`base` (the engine-owning actor base class), `messages` (what crosses the process boundary),
`fingerprint` (a worker's KV layout for the transfer handshake) and `validation` (prompt checks,
pure Python). Prefill and decode import this, never each other; the router imports `messages` and
`validation`, which pull in no torch. Nothing is re-exported here, so importing one module does not
load the engine.
"""
