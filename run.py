"""Train a prefix from the composed Hydra config: `python run.py [group=option ...] [key=value ...]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from prefix_lightning.cli import report_errors  # imported after Hydra parsed the command line: fast --help
    from prefix_lightning.training.train import train

    return report_errors(lambda: train(cfg))


if __name__ == "__main__":
    main()
