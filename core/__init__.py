"""The core: what every part of the product shares (atomic writes, paths, config schema, record
formats, job states, the state database, locks, the trainer interface). It imports nothing of the
project and nothing outside the standard library except pydantic (for the config schema only).
"""
