"""The data plane: job runners over the ML stack (never Django)."""

from workers.runtime.hubkernels import refuse_hub_kernels

# Before any module here can import bitsandbytes or transformers: see workers/runtime/hubkernels.py.
refuse_hub_kernels()
