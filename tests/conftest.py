import os
import sys

# The tests import `tests.oracle`; run from the repository root or anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter; the variable
# must be set before triton is first imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
