"""Gloo process groups for the tests that check N workers equal one process."""

import contextlib
import socket

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int):
    """Join a gloo group over TCP; leave it only once every rank is done.

    Tearing a gloo group down while a peer is still inside a collective aborts that peer
    ("terminate called without an active exception"), so a barrier precedes the teardown.
    """
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
