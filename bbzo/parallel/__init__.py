"""Forward parallelization (DeepZero Eq. (5)): a step's probes evaluated across processes and machines.

* :mod:`.context` -- joining the ``torch.distributed`` process group ``torchrun`` describes; rank 0 writes;
* :mod:`.executor` -- :class:`SerialExecutor` and the master-less :class:`DistributedExecutor`;
* :mod:`.codec` -- the one message a distributed step's ranks exchange (named fields, no magic offsets);
* :mod:`.launch` -- ``--workers M``: the same run under ``torch.distributed.run`` with M local processes.
"""

from .context import (DEFAULT_WORKER_TIMEOUT, DistContext, agree, current, is_writer, plan_devices, rank, setup,
                      shutdown, silent_peers, world_size)
from . import codec
from .executor import DistributedExecutor, Executor, SerialExecutor, as_executor, deal, default_executor

__all__ = ["DistContext", "setup", "plan_devices", "current", "is_writer", "rank", "world_size", "shutdown", "agree",
           "silent_peers", "DEFAULT_WORKER_TIMEOUT",
           "Executor", "SerialExecutor", "DistributedExecutor", "deal", "as_executor", "default_executor"]
