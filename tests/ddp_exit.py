"""The end of every 2-process DDP script the tests run as their own programs."""
import torch.distributed as dist


def shut_down() -> None:
    """Close the process group in order on every rank: with it still up at interpreter exit,
    gloo's threads have aborted a finished run ("terminate called without an active
    exception"), failing a test whose results were already written."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
