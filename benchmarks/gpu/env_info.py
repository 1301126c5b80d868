"""Print and save what a GPU stage ran on: GPU, driver, torch, CUDA, nvcc, Python, CPU count.

    python3 benchmarks/gpu/env_info.py OUT.json

Imports torch but not ntkfast, so it runs before the build. nvidia-smi and nvcc are optional.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys


def _cmd(*args) -> str:
    if shutil.which(args[0]) is None:
        return None
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except Exception:
        return None


def collect() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "driver": None,
        "nvcc": None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    nvcc = _cmd("nvcc", "--version")
    if nvcc:
        info["nvcc"] = nvcc.splitlines()[-1]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        smi = _cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        if smi:
            info["driver"] = smi.splitlines()[0].strip()
    else:
        info["gpu"] = "none (cpu " + (platform.processor() or platform.machine()) + ")"
    return info


def main() -> int:
    info = collect()
    text = json.dumps(info, indent=1)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
