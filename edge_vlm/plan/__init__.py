"""`edge-vlm plan`: will this model run on that device, and what should I choose if not?

    devices.py  the device table (memory, what the OS/driver keeps, bandwidth), each row with its source
    shapes.py   a model's shape (parameter counts, KV geometry) from a bundle, a source or a family name
    memory.py   the memory model: peak memory component by component, per backend/bits/precision
    advise.py   fits? how much room? if not, the nearest configuration that does

Every constant in memory.py says where it comes from; `edge-vlm bench` checks the predictions
against measured peak RSS for every bundle it runs.
"""
