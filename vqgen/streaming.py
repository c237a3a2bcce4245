"""Streamed training data for both stages: a `datasets` stream read by every rank and worker in its own part, as
batches that carry their position, and that position checkpointed so a resumed run continues the stream."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vqgen.cli import VqgenError
from vqgen.preemption import DEFAULT_STOP_SIGNALS, worker_init_for


class StreamBatches(torch.utils.data.IterableDataset):
    """The train split of a `datasets` stream as an endless sequence of batches; subclasses turn rows into
    tensors (`make_batch`).

    Every rank reads its own part of the stream and every DataLoader worker its own part of that (whole shards
    when there are enough); rows pass through a shuffle buffer, and epochs roll over inside each worker, so
    training runs by steps and no rank waits for another's stream to end. The dataset is Stateful: its
    `state_dict` is this worker's position after its last batch (the epoch, the rows it made and
    `IterableDataset.state_dict()`), which torchdata's `StatefulDataLoader` snapshots per worker with every batch
    and hands back to the same worker on resume (datasets restores the shard and the row in it; the rows that sat
    in the shuffle buffer are not replayed, so a resumed stream is row for row the uninterrupted one only with a
    buffer of 1). Each batch also says which worker and epoch made it (`position`), for logs and tests.
    """

    def __init__(self, raw, seed: int, shuffle_buffer: int, source: str):
        self.raw, self.seed, self.shuffle_buffer, self.source = raw, seed, shuffle_buffer, source
        self.batch_size, self.rank, self.world = 1, 0, 1
        self.position: dict | None = None  # {"epoch", "rows", "stream"} after this worker's last batch
        self.resume: dict | None = None  # a position to continue from, set by load_state_dict

    def configure(self, batch_size: int, rank: int, world: int):
        self.batch_size, self.rank, self.world = batch_size, rank, world
        return self

    def make_batch(self, rows: dict, worker: int, epoch: int, first_row: int) -> dict:
        """Columns of `batch_size` rows -> the batch's tensors."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return dict(self.position or {})

    def load_state_dict(self, state: dict) -> None:
        self.resume = dict(state) if state else None

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        state, self.resume = self.resume, None
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
                self.position = {"epoch": epoch, "rows": made, "stream": ds.state_dict()}
                yield {**batch, "position": {"worker": worker, "epoch": epoch}}
                batches += 1
            if batches == 0 and not resumed:  # (a resumed position may sit at the end of an epoch)
                raise VqgenError(
                    f"{self.source}: rank {self.rank} worker {worker} got less than one batch ({self.batch_size} "
                    "rows) from the stream; lower train.num_workers or train.batch_size"
                )
            epoch += 1  # the last partial batch is dropped, like drop_last on a map-style split


STREAM_STATE = "stream_state_{rank}.pt"  # one per rank in each checkpoint of a streamed run


def save_stream_state(loader, checkpoint: Path, rank: int, world: int) -> None:
    """This rank's stream position into the checkpoint (every rank writes its own: each reads another part of
    the stream, and accelerate's registered objects are saved by the main process alone, so ranks >= 1 used to
    resume from rank 0's position). Written to a temporary name and renamed: a file that exists is whole."""
    state = {"num_workers": loader.num_workers, "world": world, "loader": loader.state_dict()}
    path = Path(checkpoint) / STREAM_STATE.format(rank=rank)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_stream_state(loader, checkpoint: Path, rank: int, world: int) -> None:
    """Restore this rank's stream position, with one clear error where the run cannot continue exactly: another
    number of processes or workers than the checkpoint's, or a checkpoint without stream positions."""
    path = Path(checkpoint) / STREAM_STATE.format(rank=rank)
    if not path.is_file():
        raise VqgenError(
            f"{checkpoint} holds no stream position for rank {rank} ({path.name}): it was saved by a run with fewer "
            f"processes, or by one that did not stream. A streamed run resumes only as it was launched ({world} "
            "processes now)",
            every_rank=True,
        )
    state = torch.load(path, weights_only=False)  # our own file: positions hold datasets' plain Python state
    if state["world"] != world:
        raise VqgenError(
            f"this run was checkpointed with {state['world']} processes; a streamed source resumes only with the "
            f"same number (got {world})",
            every_rank=True,
        )
    if state["num_workers"] != loader.num_workers:
        raise VqgenError(
            f"this run was checkpointed with train.num_workers={state['num_workers']}; a streamed source "
            f"resumes only with the same number (got {loader.num_workers})",
            every_rank=True,
        )
    loader.load_state_dict(state["loader"])


def stream_loader(
    dataset: StreamBatches, accelerator, per_device: int, workers: int, stop_signals=DEFAULT_STOP_SIGNALS
):
    """The loader of a stream: torchdata's StatefulDataLoader, not prepared by accelerate (whose batch dispatching
    would have rank 0 read for all; the loop moves batches to the device). Its position goes into each checkpoint
    through `save_checkpoint(..., stream=loader)`, one file per rank."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset.configure(per_device, accelerator.process_index, accelerator.num_processes)
    loader = StatefulDataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: a DataLoader without one draws its base seed from the global RNG whenever an
        # iterator starts, which a resumed run does where the uninterrupted one did not (dropout would shift).
        generator=torch.Generator().manual_seed(dataset.seed),
        worker_init_fn=worker_init_for(stop_signals) if workers else None,  # the main process stops them
    )
    return loader
