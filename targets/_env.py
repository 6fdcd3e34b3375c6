"""Process environment that must be set before ``import tvm`` (spec pitfall 12).

TVM's thread pool reads ``TVM_NUM_THREADS`` once, at import; without it the pool may run a single thread.  Every
module of this package that imports tvm imports this module first.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)))))
