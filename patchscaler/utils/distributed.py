"""Data-parallel inference under torchrun: ``torchrun --nproc_per_node N tools/infer.py ...`` runs one process per
rank, each on its own device and every N-th image; the ranks' summaries are gathered (gloo, once, at the end)
so that rank 0 prints one. Without torchrun (no ``WORLD_SIZE``/``RANK``) none of this applies."""
import os
from datetime import timedelta

from .errors import ConfigError

#: the gather waits for the slowest rank: allow as long as a shard can take longer than another
GATHER_TIMEOUT = timedelta(days=7)


def torchrun_rank():
    """(rank, world size, local rank) when started by torchrun with 2+ processes, else None."""
    if 'WORLD_SIZE' not in os.environ or 'RANK' not in os.environ:
        return None
    try:
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        local = int(os.environ.get('LOCAL_RANK', rank))
    except ValueError:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {os.environ.get('RANK')!r} / "
                          f"{os.environ.get('WORLD_SIZE')!r} / {os.environ.get('LOCAL_RANK')!r}") from None
    return (rank, world, local) if world > 1 else None


def rank_device(device, local_rank):
    """The device of the rank with ``local_rank``: cuda:LOCAL_RANK when CUDA is available (``device`` None, auto or
    cuda), else cpu; ``device`` cpu puts every rank on the CPU. A cuda:N would put every rank on one GPU: refused."""
    import torch
    if device == 'cpu':
        return torch.device('cpu')
    if device not in (None, 'auto', 'cuda'):
        raise ConfigError(f'under torchrun each rank runs on cuda:LOCAL_RANK (or all on --device cpu); --device '
                          f'{device} would put every rank on one device')
    if not torch.cuda.is_available():
        if device == 'cuda':
            raise ConfigError('device cuda asked for but this torch sees no GPU')
        return torch.device('cpu')
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f'rank with LOCAL_RANK {local_rank} has no GPU (this torch sees {torch.cuda.device_count()});'
                          f' start at most that many processes per node')
    torch.cuda.set_device(local_rank)
    return torch.device('cuda', local_rank)


def all_gather(obj):
    """Every rank's picklable ``obj``, in rank order, on every rank (a gloo group made for this one call)."""
    import torch.distributed as dist
    dist.init_process_group('gloo', timeout=GATHER_TIMEOUT)
    try:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
    finally:
        dist.destroy_process_group()
    return out
