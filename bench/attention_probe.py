"""Which attention kernel F.scaled_dot_product_attention runs for FLUX.2 [dev] shapes on this GPU, whether
offload.py's selective checkpoint recognises it, and whether torch.compile'd glue stays compiled inside it
(the checkpoint's dispatch modes must declare ignore_compile_internals). Prints one line each."""
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from torch.utils._python_dispatch import TorchDispatchMode

import offload


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func)
        return func(*args, **(kwargs or {}))


q = torch.randn(1, 48, 4608, 128, device="cuda", dtype=torch.bfloat16)
with Ops() as ops:
    F.scaled_dot_product_attention(q, q, q)
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
print("SDPA dispatches to:", [str(f) for f in ops.names], "-- kept by offload:",
      any(f in offload._ATTENTION_OPS for f in ops.names))
for mode in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode"):
    cls = getattr(ckpt, mode, None)
    print(f"{mode}.ignore_compile_internals:", cls is not None and hasattr(cls, "ignore_compile_internals")
          and cls.ignore_compile_internals())
