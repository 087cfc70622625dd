"""One PPO job with KL control. `python train.py controller=pid controller.target_kl=0.05 steps=200`.

Re-running with the same `hydra.run.dir=...` resumes from that directory's last checkpoint.

`python train.py -m seed=0,1,2` is Hydra's BasicSweeper: the jobs run one after another in this process, in
multirun/train/<time>/<n>/, with one W&B group per multirun (train_<time>); add `hydra/launcher=local` to run them
side by side (threads per job from the launcher). For the experiment grid (`fixed` once per β, resume of a sweep,
the report), use sweep.py.
"""

import gc
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import kl_research.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from kl_research.train import train

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and cfg.wandb.group is None:  # `train.py -m`: sweep.py sets its own group
        cfg.wandb.group = f"{hc.job.name}_{Path(hc.sweep.dir).name}"
        log.info("W&B group %s: the jobs of this multirun (%s)", cfg.wandb.group, hc.sweep.dir)
    # Everything imported so far (torch, transformers, hydra: ~10⁶ objects) lives as long as the process: out of
    # the cyclic GC's reach, its collections stop re-scanning them and the interpreter's exit stops collecting them
    # (measured: the exit after `import kl_research.train` 1.0 -> 0.16 s, a cost every sweep job paid). Collected
    # first, so a multirun's earlier jobs leave no garbage frozen. docs/performance.md
    gc.collect()
    gc.freeze()
    summary = train(cfg, hc.runtime.output_dir)
    return summary["reward"]


if __name__ == "__main__":
    main()
