"""Hydra plugin for the KL-control experiment grid (RESEARCH.md §5).

- ``hydra/sweeper=kl_grid`` (:mod:`.sweeper`): controller × target KL × seed fan-out, ``fixed`` once per
  seed (× ``fixed_betas``), one directory per sweep, resume of what is missing or failed, a report.
- ``hydra/launcher=local`` / ``hydra/launcher=slurm`` (:mod:`.launchers`, YAML in ``conf/hydra/launcher``):
  the submitit launchers, made tolerant to a failing job and, locally, limited to ``max_parallel`` jobs.
- ``hydra.callbacks.job_failure`` (:mod:`.callbacks`): a failing job writes its traceback to ``error.txt``.

Hydra imports every module of this package when it scans for plugins (before composing the config), which
is what registers the schemas of :mod:`.config` in the ConfigStore.
"""
