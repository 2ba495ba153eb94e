"""A module-scoped, autouse 1-process gloo group for tests that run the reference's losses."""
import socket

import pytest


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    """iBOT's Sinkhorn-Knopp all-reduces unconditionally; a 1-process gloo group makes it run."""
    import torch
    if torch.distributed.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
