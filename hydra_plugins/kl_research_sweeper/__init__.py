"""Hydra plugin for the KL-control experiment grid (docs/sweeps.md).

What Hydra's BasicSweeper and the stock submitit launchers cannot do, in the smallest form:

- ``hydra/sweeper=kl_grid`` (:mod:`.sweeper`, :mod:`.grid`): controller × target KL × seed fan-out, ``fixed``
  once per seed (× ``fixed_betas``), one directory per sweep, resume of what is missing or failed, and the
  guard against resubmitting a job SLURM still holds;
- ``hydra/launcher=local`` / ``hydra/launcher=slurm`` (:mod:`.launchers`, YAML in ``conf/hydra/launcher``):
  submitit launchers whose ``launch()`` survives a failing job and, locally, runs at most ``max_parallel``.

The rest sits on Hydra's public callbacks (:mod:`.callbacks`, ``hydra.callbacks`` in conf/sweep.yaml): the
reference built once before the jobs, the report and exit status after them, a failing job's traceback. What the
sweeper and the callbacks share (``sweep.json``, the failed-sweep exit) is :mod:`.common`'s: neither imports the other.

Hydra imports every module of this package when it scans for plugins (before composing the config), which
is what registers the schemas of :mod:`.config` in the ConfigStore.
"""
