"""The study's stages, one module each (``report`` a package), each job run as
``python -m pipeline.stages <stage> ... --log <file>``: the command Snakemake and DVC share,
written once in the job table (:attr:`pipeline.dag.Job.cmd`). That entry
(``pipeline/stages/__main__.py``) stays light, so a job can hand itself to the fork server
(:mod:`pipeline.forkserver`) before torch loads; the stage modules import what they use at
their top. :mod:`pipeline.stages.common` holds what every stage shares: its arguments, log,
device, data and run record.
"""
