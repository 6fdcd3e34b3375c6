"""Process environment that must be set before ``import tvm`` (without ``TVM_NUM_THREADS`` set first, TVM's pool ran one thread on a 2-core machine).

TVM's thread pool reads ``TVM_NUM_THREADS`` once, at import; without it the pool may run a single thread.  Every
module of this package that imports tvm imports this module first.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)))))
