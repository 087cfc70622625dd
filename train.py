"""One PPO job with KL control. `python train.py controller=pid controller.target_kl=0.05 steps=200`.

Re-running with the same `hydra.run.dir=...` resumes from that directory's last checkpoint.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import kl_research.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from kl_research.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    summary = train(cfg, HydraConfig.get().runtime.output_dir)
    return summary["reward"]


if __name__ == "__main__":
    main()
