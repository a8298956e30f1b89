"""Names that moved between the torch versions the project supports (2.11 to 2.14).

torch 2.12 renamed `all_gather_tensor_autograd` to `all_gather_single_autograd` (the old
name stays as a deprecated alias) and 2.13 deprecated `dist.all_gather_into_tensor` in
favour of `dist.all_gather_single`, warning on every call. The new name is taken where it
exists, so neither an ImportError on 2.11 nor a warning per step on 2.14.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.distributed._functional_collectives as functional

all_gather_single_autograd = getattr(functional, "all_gather_single_autograd", None) or \
    functional.all_gather_tensor_autograd
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
