"""Train a prefix from the composed Hydra config: `python run.py [group=option ...] [key=value ...]`; go on with an
interrupted run: `python run.py resume=<run dir>`."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from prefix_lightning.cli import report_errors  # imported after Hydra parsed the command line: fast --help
    from prefix_lightning.training.train import train

    return report_errors(lambda: train(cfg))


if __name__ == "__main__":
    # resume=: that run's config, in its folder; group=null: Hydra's traceback, unless refused first
    if any(argument.startswith("resume=") or argument.lower().endswith("null") for argument in sys.argv[1:]):
        from prefix_lightning.cli import report_errors
        from prefix_lightning.training.compose import check_group_choices
        from prefix_lightning.training.resume import resume_arguments

        report_errors(lambda: check_group_choices(sys.argv[1:]))
        sys.argv = report_errors(lambda: resume_arguments(sys.argv))
    main()
