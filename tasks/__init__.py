"""The work an audit does, as plain functions (no Prefect import) plus thin Prefect wrappers in `tasks.steps`.

Only `tasks.steps` imports Prefect; everything else here can be tested, profiled and reused without an
orchestrator.
"""
