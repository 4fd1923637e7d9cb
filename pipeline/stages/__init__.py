"""The study's stages, one module each (``report`` a package), each run as
``python -m pipeline.stages.<stage> ... --log <file>``: the command Snakemake and DVC share,
written once in the job table (:mod:`pipeline.dag`). :mod:`pipeline.stages.common` holds what
every stage shares: its arguments, log, device, data and run record.

A stage module is imported by the job's own process, which hands itself to the fork server
(:mod:`pipeline.forkserver`) before torch loads: so its top imports stay light, and torch and
the library modules that import it are imported in the functions that use them.
"""
