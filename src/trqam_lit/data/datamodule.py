"""LightningDataModule over one OGBench single-task dataset (or a directory of shards), yielding chunk batches."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trqam_lit.data.chunks import ChunkTable
from trqam_lit.data.errors import DatasetNotFoundError
from trqam_lit.data.loading import (
    check_dataset_file,
    decompress_npz,
    load_table,
    process_dataset,
    read_dataset,
)
from trqam_lit.data.ogbench_env import env_spaces, make_ogbench_env
from trqam_lit.data.online_data import OnlineDataModule
from trqam_lit.data.paths import dataset_name_for, expected_files, missing_dataset_message, resolve_dataset_dir
from trqam_lit.data.replay import (
    ReplayBuffer,
    batch_rng,
    deferred_batch,
    draw_batch,
)


class _SourceRef:
    """Mutable handle so a running stream picks up the replay buffer once the online phase installs it.

    ``defer_from``: from this global step on the stream yields placeholders, drawn at transfer time.
    """

    def __init__(self) -> None:
        self.source: ChunkTable | ReplayBuffer | ShardCycler | None = None
        self.defer_from: int | None = None


class ShardCycler:
    """A directory of shards (the 100M releases): shard ``i`` is loaded on demand, the next one in the background.

    Args:
        paths: shard files in cycling order.
        env_name: single-task env name used for checks and relabelling.
        compact: load shards in the compact layout.
        sparse: sparse rewards.
        prefetch: load the next shard in a background thread while the current one is sampled.
    """

    def __init__(self, paths: list[Path], env_name: str, compact: bool, sparse: bool, prefetch: bool = True) -> None:
        self.paths = list(paths)
        self.env_name, self.compact, self.sparse, self.prefetch = env_name, compact, sparse, prefetch
        self._current: tuple[int, ChunkTable] | None = None
        self._pending: dict[int, Future] = {}
        self._executor: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the paths only; each loads its own shards.
        return {**self.__dict__, "_current": None, "_pending": {}, "_executor": None}

    def get(self, i: int) -> ChunkTable:
        """Table of shard ``i mod len(paths)``, waiting for its prefetch if one is running."""
        i %= len(self.paths)
        if self._current is None or self._current[0] != i:
            future = self._pending.pop(i, None)
            self._current = None  # free the old shard before the new one is complete in memory
            # The background thread only decompresses (decompress_npz: no ast, see there); headers are parsed
            # and the env relabels here, in the sampling thread.
            data = future.result() if future is not None else None
            future = None  # it holds the decompressed file too
            raw = read_dataset(self.paths[i], self.env_name, compact=self.compact, data=data)
            del data
            table = process_dataset(raw, self.env_name, sparse=self.sparse, source=str(self.paths[i]))
            self._current = (i, table)
        nxt = (i + 1) % len(self.paths)
        if self.prefetch and nxt != i and nxt not in self._pending:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trqam-shard")
            self._pending = {nxt: self._executor.submit(decompress_npz, self.paths[nxt])}
        return self._current[1]


class ChunkStream(IterableDataset):
    """Infinite stream of chunk batches; the batch of global step k is drawn with ``batch_rng(seed, rank, k)``.

    Args:
        ref: handle on the table, replay buffer or shard cycler to sample from.
        batch_size: chunks per batch.
        horizon: chunk length H.
        discount: gamma of the H-step return.
        seed: base seed.
        rank: global rank, so each DDP rank draws a different stream.
        start_step: global step the stream starts at (a resumed run continues with the batches and shard order of an
            uninterrupted one).
        shard_steps: batches drawn from one shard before moving to the next.
    """

    def __init__(
        self,
        ref: _SourceRef,
        *,
        batch_size: int,
        horizon: int,
        discount: float,
        seed: int,
        rank: int = 0,
        start_step: int = 0,
        shard_steps: int = 1000,
    ) -> None:
        super().__init__()
        self.ref = ref
        self.batch_size, self.horizon, self.discount = batch_size, horizon, discount
        self.seed, self.rank, self.start_step, self.shard_steps = seed, rank, start_step, shard_steps

    def _source_at(self, step: int) -> ChunkTable | ReplayBuffer:
        source = self.ref.source
        if source is None:
            raise RuntimeError("the DataModule has no data yet: call setup('fit') first")
        if isinstance(source, ShardCycler):
            # Ranks start on different shards; every shard_steps batches each moves on to the next one.
            return source.get(self.rank + step // self.shard_steps)
        return source

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # The DataLoader takes batches from its workers in turn: worker w of W yields steps start + w, + W, ...
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + worker
        while True:
            if self.ref.defer_from is not None and step >= self.ref.defer_from:
                yield deferred_batch(step)
            else:
                rng = batch_rng(self.seed, self.rank, step)
                yield draw_batch(self._source_at(step), rng, self.batch_size, self.horizon, self.discount)
            step += workers


class ChunkDataModule(OnlineDataModule):
    """What every dataset-backed domain shares: the seeded batch stream, the evaluator over the domain's environment
    factory, and the online phase over a replay buffer.

    A domain supplies :meth:`_load_source` (its processed data: a :class:`ChunkTable`, or a :class:`ShardCycler`),
    :meth:`env_factory` (a picklable callable returning a fresh environment) and, if its online rewards need the
    offline data's transformation, :meth:`_replay_buffer_options`. Batches are dicts of float32 tensors:
    ``observations`` (B, obs_dim), ``actions`` (B, chunk_dim) flattened row-major, ``rewards`` (B,) discounted
    H-step return, ``masks`` (B,), ``valid`` (B,), ``next_observations`` (B, obs_dim).
    """

    obs_dim: int
    action_dim: int

    def __init__(
        self,
        *,
        horizon: int,
        discount: float,
        batch_size: int,
        seed: int,
        num_workers: int,
        pin_memory: bool,
        eval_episodes: int,
        eval_envs: int,
        eval_workers: int,
        shard_steps: int = 1000,
    ) -> None:
        super().__init__()
        if horizon < 1 or batch_size < 1 or shard_steps < 1:
            raise ValueError(
                f"horizon, batch_size, shard_steps must be >= 1, got {horizon}, {batch_size}, {shard_steps}"
            )
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        if eval_workers < 0:
            raise ValueError(f"eval_workers must be >= 0 (0: environments in the training process), got {eval_workers}")
        self.horizon, self.discount, self.batch_size, self.seed = horizon, discount, batch_size, seed
        self.shard_steps = shard_steps
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.eval_episodes, self.eval_envs, self.eval_workers = eval_episodes, eval_envs, eval_workers
        self.table: ChunkTable | None = None
        self._ref = _SourceRef()
        self._evaluator: Any = None

    @property
    def chunk_dim(self) -> int:
        """H * action_dim: the flattened action chunk the policy outputs."""
        return self.horizon * self.action_dim

    # ---- what a domain supplies --------------------------------------------------------------------------------
    def _load_source(self) -> ChunkTable | ShardCycler:
        """The processed data batches are drawn from (called once, in ``setup('fit')``)."""
        raise NotImplementedError

    def env_factory(self) -> Callable[[], Any]:
        """A picklable callable returning a fresh environment of this domain (evaluation workers receive it)."""
        raise NotImplementedError

    def _replay_buffer_options(self) -> dict[str, Any]:
        """The reward transformation (``reward_offset``, ``sparse``) that makes environment rewards the offline data's:
        keyword arguments of :class:`ReplayBuffer` and of the evaluator's discounted return."""
        return {}

    # ---- written once ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load the data for fitting; other stages need no dataset."""
        if stage not in (None, "fit") or self._ref.source is not None:
            return
        source = self._load_source()
        self.table = source if isinstance(source, ChunkTable) else None
        self._ref.source = source

    def _rank_and_step(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        return int(trainer.global_rank), int(trainer.global_step)

    def train_dataloader(self) -> DataLoader:
        """Infinite, seeded, per-rank-distinct stream of ready-made batches (``batch_size=None``)."""
        rank, step = self._rank_and_step()
        stream = ChunkStream(
            self._ref,
            batch_size=self.batch_size,
            horizon=self.horizon,
            discount=self.discount,
            seed=self.seed,
            rank=rank,
            start_step=step,
            shard_steps=self.shard_steps,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        """One item per rank: an evaluation is a batch of environment rollouts, not a pass over a dataset."""
        from trqam_lit.training.evaluation import evaluation_dataloader

        return evaluation_dataloader()

    def test_dataloader(self) -> DataLoader:
        """`trqam-lit test` runs the same evaluation as `validate`."""
        return self.val_dataloader()

    def make_evaluator(self) -> Any:
        """Batched rollouts on fresh environments from :meth:`env_factory` (never the one used for relabelling).

        Built once and reused, so its environments are created only at the first evaluation.
        """
        from trqam_lit.training.evaluation import RolloutEvaluator

        if self._evaluator is None:
            self._evaluator = RolloutEvaluator(
                self.env_factory(),
                horizon=self.horizon,
                action_dim=self.action_dim,
                num_episodes=self.eval_episodes,
                num_envs=self.eval_envs,
                seed=self.seed,
                workers=self.eval_workers,
                discount=self.discount,
                **self._replay_buffer_options(),
            )
        return self._evaluator

    def teardown(self, stage: str) -> None:
        if self._evaluator is not None:  # stop its worker processes, if any
            self._evaluator.close()
            self._evaluator = None

    # ---- online phase (training.online.OnlinePhase) -------------------------------------------------------------
    def make_online_env(self) -> Any:
        """A fresh environment for online interaction (never the relabelling or evaluation one)."""
        return self.env_factory()()

    def defer_sampling_from(self, step: int) -> None:
        """Batches of global steps >= ``step`` are drawn in :meth:`on_before_batch_transfer`, i.e. after the
        environment steps that precede their gradient step (Lightning fetches one batch ahead)."""
        self._ref.defer_from = int(step)

    def _draw_deferred(self, step: int) -> dict[str, Any]:
        rank, _ = self._rank_and_step()
        source = self.replay_buffer if self.replay_buffer is not None else self._ref.source
        if isinstance(source, ShardCycler):
            source = source.get(rank + step // self.shard_steps)
        rng = batch_rng(self.seed, rank, step)
        return draw_batch(source, rng, self.batch_size, self.horizon, self.discount)

    def _new_replay_buffer(self, capacity_extra: int) -> ReplayBuffer:
        """A replay buffer over the offline data that the batch stream samples from now on.

        With a shard directory the buffer holds one shard: the one this rank samples at the start of the online
        phase (``defer_sampling_from``; else the current step), as the reference does.
        """
        if self.num_workers > 0:
            raise ValueError("the replay buffer lives in the training process: use num_workers=0 for the online phase")
        self.setup("fit")
        source = self._ref.source
        if isinstance(source, ShardCycler):
            # As the reference: the buffer starts from the shard in use when the offline phase ends (so a resumed
            # run rebuilds it from the same shard).
            rank, step = self._rank_and_step()
            start = step if self._ref.defer_from is None else self._ref.defer_from
            source = source.get(rank + start // self.shard_steps)
        buffer = ReplayBuffer(source, capacity_extra=capacity_extra, **self._replay_buffer_options())
        self.table = None  # the buffer holds its own copy; drop ours
        self._ref.source = buffer
        return buffer


class OGBenchDataModule(ChunkDataModule):
    """OGBench single-task data as an infinite stream of action-chunk batches (data.md sections 2 and 4).

    ``obs_dim``, ``action_dim`` and ``chunk_dim`` are known right after ``__init__``.
    """

    def __init__(
        self,
        env_name: str = "cube-double-play-singletask-task2-v0",
        dataset_dir: str | None = None,
        dataset_path: str | None = None,
        horizon: int = 5,
        discount: float = 0.995,
        batch_size: int = 256,
        sparse: bool = False,
        compact: bool = False,
        seed: int = 0,
        shard_steps: int = 1000,
        shard_prefetch: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        eval_episodes: int = 50,
        eval_envs: int = 10,
        eval_workers: int = 0,
    ) -> None:
        """
        Args:
            env_name: single-task OGBench env, e.g. ``cube-double-play-singletask-task2-v0``.
            dataset_dir: directory of ``<dataset>.npz`` files; None reads $TRQAM_DATA_DIR, else ~/.ogbench/data;
                ``fixture`` uses the tiny datasets shipped inside the package.
            dataset_path: explicit dataset file, or a directory of ``.npz`` shards (100M releases); wins over
                dataset_dir.
            horizon: action chunk length H (1 is ordinary one-step TD).
            discount: discount gamma of the H-step return.
            batch_size: chunks per batch.
            sparse: replace rewards by -1 * (reward != 0) (QAM's setting on scene and puzzle).
            compact: keep raw rows and an index map instead of next_observations (about half the memory).
            seed: base seed of the batch stream, combined with the global rank.
            shard_steps: with a shard directory, batches drawn from one shard before moving to the next.
            shard_prefetch: load the next shard in a background thread.
            num_workers: DataLoader worker processes (0: sample in the training process; the replay buffer needs 0).
            pin_memory: pin batches for faster host-to-GPU copies.
            eval_episodes: episodes per evaluation (data.md section 6), sharded over ranks.
            eval_envs: environments stepped at once during evaluation, in two groups that take turns (one batched
                policy call per group and chunk).
            eval_workers: step the evaluation environments in this many worker processes (each runs its environments'
                action chunks; same episodes and values as 0, which steps them in the training process); one group's
                policy call then runs while the workers step the other's chunks. Useful up to the number of idle
                cores, e.g. 8 of 16 beside a GPU training; at most eval_envs. With all episodes in one wave
                (eval_envs = eval_episodes) it reaches 0.81-0.85 of the physics limit on 2 cores (docs/performance.md).
        """
        super().__init__(
            horizon=horizon,
            discount=discount,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            pin_memory=pin_memory,
            eval_episodes=eval_episodes,
            eval_envs=eval_envs,
            eval_workers=eval_workers,
            shard_steps=shard_steps,
        )
        self.save_hyperparameters()
        self.env_name = env_name
        self.dataset_name = dataset_name_for(env_name)
        self.dataset_dir = dataset_dir
        self.dataset_path = dataset_path
        self.sparse, self.compact, self.shard_prefetch = sparse, compact, shard_prefetch
        self.obs_dim, self.action_dim = env_spaces(env_name)

    def dataset_files(self) -> list[Path]:
        """The file(s) this DataModule reads, checked to exist; shards come sorted.

        Raises:
            DatasetNotFoundError: naming the exact expected file(s) and how to obtain them.
        """
        if self.dataset_path is not None:
            path = Path(self.dataset_path).expanduser()
            if path.is_dir():
                shards = sorted(p for p in path.glob("*.npz") if not p.name.endswith("-val.npz"))
                if not shards:
                    raise DatasetNotFoundError(f"shard directory {path} holds no <name>.npz shards (only -val files?)")
                return shards
            train, val, flag = path, path.with_name(path.name.replace(".npz", "-val.npz")), str(path.parent)
        else:
            train, val = expected_files(self.env_name, self.dataset_dir)
            flag = None if self.dataset_dir is None else str(resolve_dataset_dir(self.dataset_dir))
        if not train.is_file():
            raise DatasetNotFoundError(missing_dataset_message(self.env_name, train, val, flag))
        return [train]

    def _load_source(self) -> ChunkTable | ShardCycler:
        files = self.dataset_files()
        if self.uses_shards:
            check_dataset_file(files[0], self.env_name)  # fail now, not at the first batch, on a wrong directory
            return ShardCycler(files, self.env_name, self.compact, self.sparse, self.shard_prefetch)
        return load_table(files[0], self.env_name, compact=self.compact, sparse=self.sparse)

    @property
    def uses_shards(self) -> bool:
        """Whether ``dataset_path`` is a directory of shards."""
        return self.dataset_path is not None and Path(self.dataset_path).expanduser().is_dir()

    def env_factory(self) -> Callable[[], Any]:
        """The single-task environment (separate instances from the one ogbench's relabelling used)."""
        return functools.partial(make_ogbench_env, self.env_name)

    def _replay_buffer_options(self) -> dict[str, Any]:
        return {"sparse": self.sparse}
