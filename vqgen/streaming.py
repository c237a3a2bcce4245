"""Streamed training data for both stages: a `datasets` stream read by every rank and worker in its own part, as
batches that carry their position, and that position checkpointed so a resumed run continues the stream."""

from __future__ import annotations

import torch

from vqgen.cli import VqgenError


class StreamBatches(torch.utils.data.IterableDataset):
    """The train split of a `datasets` stream as an endless sequence of batches; subclasses turn rows into
    tensors (`make_batch`).

    Every rank reads its own part of the stream and every DataLoader worker its own part of that (whole shards
    when there are enough); rows pass through a shuffle buffer, and epochs roll over inside each worker, so
    training runs by steps and no rank waits for another's stream to end. Each batch carries its worker's
    position after it (the epoch and `IterableDataset.state_dict()`); `StreamPosition` keeps the position of
    the last batch consumed per worker, and a resumed run continues each worker's stream from there (datasets
    restores the shard and the row in it; the rows that sat in the shuffle buffer are not replayed, so a
    resumed stream is row for row the uninterrupted one only with a buffer of 1).
    """

    def __init__(self, raw, seed: int, shuffle_buffer: int, source: str):
        self.raw, self.seed, self.shuffle_buffer, self.source = raw, seed, shuffle_buffer, source
        self.batch_size, self.rank, self.world = 1, 0, 1
        # {"num_workers", "workers": {worker: {"epoch", "rows", "stream"}}, "next_worker"}
        self.resume: dict | None = None

    def configure(self, batch_size: int, rank: int, world: int):
        self.batch_size, self.rank, self.world = batch_size, rank, world
        return self

    def make_batch(self, rows: dict, worker: int, epoch: int, first_row: int) -> dict:
        """Columns of `batch_size` rows -> the batch's tensors."""
        raise NotImplementedError

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        state = None
        if self.resume is not None:
            if self.resume["num_workers"] != n_workers:
                raise VqgenError(
                    f"this run was checkpointed with train.num_workers={self.resume['num_workers']}; a streamed "
                    f"source resumes only with the same number (got {n_workers})"
                )
            # The DataLoader takes batches from its workers in turn, starting at worker 0: the worker that
            # comes after the last batch consumed plays worker 0, so a resumed run takes the same order.
            worker = (worker + self.resume.get("next_worker", 0)) % n_workers
            state = self.resume["workers"].get(worker)
        epoch = state["epoch"] if state else 0
        # Rows this worker has made: a streamed row's augmentation is drawn from it, so resume restores it too.
        made = state.get("rows", 0) if state else 0
        while True:
            ds = self.raw.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(epoch)
            # Sharding here and reading through .iter() keeps datasets from sharding by worker again, and keeps
            # state_dict and load_state_dict on the same structure (datasets restores a worker-sharded state
            # into the unsharded stream and fails).
            ds = split_dataset_by_node(ds, self.rank * n_workers + worker, self.world * n_workers)
            resumed = state is not None and state["epoch"] == epoch
            if resumed:
                ds.load_state_dict(state["stream"])
            batches = 0
            for rows in ds.iter(batch_size=self.batch_size, drop_last_batch=True):
                batch = self.make_batch(rows, worker, epoch, made)
                made += self.batch_size
                position = {"worker": worker, "epoch": epoch, "rows": made, "stream": ds.state_dict()}
                yield {**batch, "position": position}
                batches += 1
            if batches == 0 and not resumed:  # (a resumed position may sit at the end of an epoch)
                raise VqgenError(
                    f"{self.source}: rank {self.rank} worker {worker} got less than one batch ({self.batch_size} "
                    "rows) from the stream; lower train.num_workers or train.batch_size"
                )
            epoch += 1  # the last partial batch is dropped, like drop_last on a map-style split


class StreamPosition:
    """The stream position of every worker after the last batch the trainer consumed; checkpointed through
    `accelerator.register_for_checkpointing`."""

    def __init__(self, dataset: StreamBatches, num_workers: int):
        self.dataset, self.num_workers = dataset, max(1, num_workers)
        self.workers: dict[int, dict] = {}
        self.next_worker = 0

    def update(self, position: dict) -> None:
        worker = int(position["worker"])
        self.workers[worker] = {
            "epoch": int(position["epoch"]),
            "rows": int(position["rows"]),
            "stream": position["stream"],
        }
        self.next_worker = (worker + 1) % self.num_workers

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "workers": dict(self.workers), "next_worker": self.next_worker}

    def load_state_dict(self, state: dict) -> None:
        self.workers = dict(state["workers"])
        self.next_worker = int(state.get("next_worker", 0))
        self.dataset.resume = {
            "num_workers": state["num_workers"],
            "workers": self.workers,
            "next_worker": self.next_worker,
        }


def stream_loader(dataset: StreamBatches, accelerator, per_device: int, workers: int):
    """(DataLoader, StreamPosition) of a stream: not prepared by accelerate (whose batch dispatching would have
    rank 0 read for all), batches moved to the device by the loop; the position is saved with checkpoints."""
    dataset.configure(per_device, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: a DataLoader without one draws its base seed from the global RNG whenever an
        # iterator starts, which a resumed run does where the uninterrupted one did not (dropout would shift).
        generator=torch.Generator().manual_seed(dataset.seed),
    )
    position = StreamPosition(dataset, workers)
    accelerator.register_for_checkpointing(position)  # before load_checkpoint, which restores it
    return loader, position
