"""Assert that every op of the ntkfast namespace has a CUDA kernel registered (and a CPU one).

    python3 benchmarks/gpu/check_cuda_registrations.py [--dry-run]

--dry-run (no CUDA build here) requires the CPU kernels only and lists the missing CUDA ones.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    import ntkfast.ops as ops

    if not ops.extension_loaded():
        print(f"check_cuda_registrations: the extension did not load: {ops.build_info().get('error')}")
        return 1
    info = ops.build_info()
    print(f"build_info: {info}")
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ntkfast::"))
    if not names:
        print("check_cuda_registrations: no op in the ntkfast namespace")
        return 1
    bad = []
    for name in names:
        has = {key: torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for key in ("CPU", "CUDA")}
        print(f"  {name:<42} CPU {'yes' if has['CPU'] else 'NO '}  CUDA {'yes' if has['CUDA'] else 'NO '}")
        if not has["CPU"] or (not has["CUDA"] and not args.dry_run):
            bad.append(name)
    if not args.dry_run and not info.get("cuda"):
        print("check_cuda_registrations: the extension was built without CUDA")
        return 1
    if bad:
        print(f"check_cuda_registrations: missing kernels for {bad}")
        return 1
    print(f"check_cuda_registrations: {len(names)} ops, every one with "
          + ("a CPU kernel (dry run: CUDA not required)" if args.dry_run else "CPU and CUDA kernels"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
