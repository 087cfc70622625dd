"""The experiment grid (docs/sweeps.md) as one Hydra multirun: controller × target KL × seed.

    python sweep.py                                              # the full grid, jobs in parallel here
    python sweep.py sweep.targets=[0.05] sweep.seeds=[0] steps=20 # a smaller one
    python sweep.py sweep=frontier                               # fixed-β reward–KL frontier
    python sweep.py hydra/launcher=slurm                         # on SLURM (site values: conf/local/)

Outputs: multirun/<sweep name>/<time>/<job>/ (.hydra/, metrics.jsonl, summary.json) and .../report/.
Re-running the same command completes only what is missing or failed; the grid, the sweep dir rule and
resume live in hydra_plugins/kl_research_sweeper/, the config in conf/sweep.yaml.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import kl_research.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)

REPO = Path(__file__).resolve().parent


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
def main(cfg: DictConfig) -> float:
    # The job runs train.py's task function. Imported here, on the node, where the repo root may not be on
    # sys.path (submitit starts `python -m submitit.core._submit` in the submission directory).
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from train import main as train_main

    return train_main(cfg)


if __name__ == "__main__":
    main()
