"""Deterministic, single-threaded CPU torch for the fixture scripts: `import fixture_env` before anything imports
torch (the thread and CPU-capability variables only take effect if set first). Every fixture script that imports it
gets the same numerics: one thread, no MKL-DNN, MKL's reproducible code path, torch's deterministic algorithms."""
import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["MKL_CBWR"] = "COMPATIBLE"
os.environ["ATEN_CPU_CAPABILITY"] = "default"

import torch  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.set_num_interop_threads(1)
torch.backends.mkldnn.enabled = False
