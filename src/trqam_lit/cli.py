"""`trqam-lit`: the LightningCLI entry point (fit, validate, test) with shapes linked from the DataModule."""

from __future__ import annotations

import re
import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from trqam_lit.agents import FlowAgent
from trqam_lit.training.callbacks import Checkpoint, EvaluationSummary, FinalEvaluation, StepsPerSecond
from trqam_lit.training.checkpoint import check_checkpoint_file
from trqam_lit.training.online import OnlinePhase
from trqam_lit.training.threads import ThreadBudget


class TRQAMCLI(LightningCLI):
    """LightningCLI with the DataModule's shapes linked into the agent and TensorBoard under ``runs/``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for src, dst in (
            ("data.obs_dim", "model.init_args.obs_dim"),
            ("data.chunk_dim", "model.init_args.action_dim"),
            ("data.horizon", "model.init_args.horizon"),
            ("data.discount", "model.init_args.discount"),
        ):
            parser.link_arguments(src, dst, apply_on="instantiate")
        # Checkpointing is always on (last.ckpt for resume), written after an evaluation of the same step; its interval
        # is a first-class option.
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1000})
        # Offline-to-online fine-tuning (training.online); online.online_steps=0 (the default) trains offline only.
        parser.add_lightning_class_args(OnlinePhase, "online")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        name_the_run(config)
        # LightningCLI reads --ckpt_path right after parsing: fail on a damaged file with a clear message first.
        if self.config.get("subcommand"):
            check_checkpoint_file(config.get("ckpt_path"), lightning=True)

    def before_fit(self) -> None:
        logger = self.trainer.logger
        if logger is not None:
            # The full resolved config, flattened, as TensorBoard hparams.
            logger.log_hyperparams(self.config[self.subcommand].as_dict())
            if self.trainer.is_global_zero:
                print(f"trqam-lit: logging to {logger.log_dir}", flush=True)

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        ckpt = self.trainer.checkpoint_callback
        logger = self.trainer.logger
        lines = ["", "trqam-lit: training finished."]
        if logger is not None:
            lines.append(f"  TensorBoard logs: {logger.log_dir}")
            lines.append(f"  open them with:   tensorboard --logdir {logger.save_dir}")
        for callback in self.trainer.callbacks:
            if isinstance(callback, EvaluationSummary) and (evaluations := callback.summary()):
                lines += ["  evaluation:", *evaluations]
        if ckpt is not None and (ckpt.last_model_path or ckpt.best_model_path):
            lines.append(f"  checkpoint:       {ckpt.last_model_path or ckpt.best_model_path}")
        print("\n".join(lines), flush=True)


def run_name(model_class_path: str, data_class_path: str, env_name: str | None) -> str:
    """``<agent>-<task>``: the agent's registry name and the environment without its suffixes, e.g.
    ``trqam-cube-double-play-task1`` (a DataModule without ``env_name``: its class name, e.g. ``trqam-toy-bandit``)."""
    from trqam_lit.agents import AGENTS

    cls_name = model_class_path.rsplit(".", 1)[-1]
    agent = next((name for name, cls in AGENTS.items() if cls.__name__ == cls_name), cls_name.lower())
    if env_name:
        task = str(env_name).replace("-singletask", "").removesuffix("-v0")
    else:
        words = re.findall(r"[A-Z][a-z0-9]*", data_class_path.rsplit(".", 1)[-1].removesuffix("DataModule"))
        task = "-".join(w.lower() for w in words) or "data"
    return f"{agent}-{task}"


def name_the_run(config) -> None:
    """The default TensorBoard logger's run name, when the config leaves it null: :func:`run_name`, so runs of
    different agents and tasks land in different folders under ``runs/`` without a logger block in every config."""
    logger = config.get("trainer", {}).get("logger")
    init = getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, bool) else None
    if init is None or init.get("name", "unset") is not None or config.get("model") is None:
        return
    data = config.get("data")
    data_init = getattr(data, "init_args", None) or {}
    init.name = run_name(config.model.class_path, getattr(data, "class_path", ""), data_init.get("env_name"))


DESCRIPTION = (
    "trqam-lit: train (fit), evaluate (validate, test) flow policies; `trqam-lit export CKPT [-o OUT]` writes a "
    "checkpoint's policy to a file that acts with torch alone (docs/cli.md)."
)


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": None, "default_hp_metric": False},  # name: name_the_run
        },
        "callbacks": [FinalEvaluation(), StepsPerSecond(), EvaluationSummary(), ThreadBudget()],
        # a run killed while saving never leaves a half-written last.ckpt (a class path: an instance here makes
        # jsonargparse warn on every fit that it cannot write it into the saved config.yaml)
        "plugins": [{"class_path": "trqam_lit.training.checkpoint.AtomicCheckpointIO"}],
        "val_check_interval": 1000,
        "num_sanity_val_steps": 0,  # an evaluation is a batch of episodes: never run one just as a sanity check
        "check_val_every_n_epoch": None,
        "log_every_n_steps": 50,
        "max_steps": 1000,
    }


def build_cli(args: list[str] | None = None, run: bool = True) -> TRQAMCLI:
    """Build (and by default run) the CLI; tests call this in-process and inspect the returned object."""
    return TRQAMCLI(
        model_class=FlowAgent,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,  # reproducible by default; --seed_everything true draws a random seed
        parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console-script entry: ``trqam-lit fit --config cfg.yaml [--overrides]``; ``trqam-lit export CKPT`` writes a
    checkpoint's policy to a file that acts with torch alone (trqam_lit.tools.export)."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from trqam_lit.tools.export import main as export_main

        export_main(argv[1:])
        return
    build_cli(args)  # None: LightningCLI reads sys.argv itself (given both, it warns)


__all__ = ["TRQAMCLI", "build_cli", "main"]

if __name__ == "__main__":
    main()
