"""training.lightning_internals against what a real Trainer does: each private attribute it reads must still exist
and still mean what the package relies on (a Lightning release that moves one fails here)."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from helpers import read_scalars
from trqam_lit.agents import BC
from trqam_lit.data.toy import ToyBanditDataModule
from trqam_lit.training.lightning_internals import logged_step, logs_this_step, validates_after_this_batch

STEPS, LOG_EVERY, VAL_EVERY = 9, 3, 4


class Probe(pl.Callback):
    """Each step's answers, asked where the package asks them."""

    def __init__(self) -> None:
        self.logs, self.validates, self.steps, self.validated_after = {}, {}, {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.logs[trainer.global_step] = logs_this_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.validates[trainer.global_step] = validates_after_this_batch(trainer)
        self.steps[trainer.global_step] = logged_step(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated_after.append(trainer.global_step)


class Validated(BC):
    def validation_step(self, batch, batch_idx) -> None:  # no environment: only when the loop validates matters
        self.log("eval/probe", float(self.global_step))

    def on_validation_epoch_start(self) -> None:
        pass

    def val_dataloader(self):
        return DataLoader([0], batch_size=1)


def test_private_lightning_attributes_answer_what_the_package_asks(tmp_path):
    dm = ToyBanditDataModule(action_dim=2, batch_size=16, eval_samples=16)
    model = Validated(obs_dim=dm.obs_dim, action_dim=dm.chunk_dim, horizon=dm.horizon, actor_hidden_dims=(8, 8))
    probe = Probe()
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="probe", default_hp_metric=False)
    trainer = pl.Trainer(
        max_steps=STEPS, log_every_n_steps=LOG_EVERY, val_check_interval=VAL_EVERY, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=dm.train_dataloader(), val_dataloaders=model.val_dataloader())

    # logs_this_step: true exactly on the steps whose scalars the logger wrote
    written = {step for step, _ in read_scalars(logger.log_dir)["actor/bc_loss"]}
    assert {step for step, logs in probe.logs.items() if logs} == written
    assert written == {step for step in range(STEPS) if (step + 1) % LOG_EVERY == 0}
    # validates_after_this_batch: true exactly after the batches the loop then validated
    assert [step for step, v in probe.validates.items() if v] == probe.validated_after == [VAL_EVERY, 2 * VAL_EVERY]
    # logged_step: the step Lightning's own scalars carry (g - 1 after update g)
    assert probe.steps == {g: g - 1 for g in range(1, STEPS + 1)}
