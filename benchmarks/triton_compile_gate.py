"""Compile the Triton assignment kernel for Hopper (sm_90) on a machine without a GPU, and report what a
GPU run depends on: whether the PTX issues wgmma, whether the SASS holds HGMMA, and the registers and
spills ptxas reports. Prints one JSON object. Run without TRITON_INTERPRET (the interpreter compiles
nothing); tests/test_triton_assign.py runs it in a subprocess.

    python3 benchmarks/triton_compile_gate.py [--precision bf16|tf32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

SIGNATURE = {"x_ptr": "*{t}", "c_ptr": "*{t}", "c_sq_ptr": "*fp32", "winner_ptr": "*i32", "best_ptr": "*fp32",
             "second_ptr": "*fp32", "finite_ptr": "*i8", "n": "i32", "k": "i32", "d": "i32", "stride_xb": "i32",
             "stride_xn": "i32", "stride_cb": "i32", "stride_ck": "i32", "stride_sqb": "i32", "stride_ob": "i32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=("bf16", "tf32"), default="bf16")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=1024)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from xdc_fast.triton_assign import GPU_TILES, _top2_kernel

    tiles = dict(GPU_TILES[args.precision])
    options = {"num_warps": tiles.pop("num_warps"), "num_stages": tiles.pop("num_stages")}
    element = "bf16" if args.precision == "bf16" else "fp32"
    signature = {name: kind.format(t=element) for name, kind in SIGNATURE.items()}
    constexprs = {"INPUT_PRECISION": "tf32", **tiles, "K_TILES": triton.cdiv(args.k, tiles["BLOCK_K"]),
                  "D_TILES": triton.cdiv(args.d, tiles["BLOCK_D"])}
    signature.update({name: "constexpr" for name in constexprs})
    kernel = triton.compile(ASTSource(fn=_top2_kernel, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as work:
        ptx, cubin = Path(work, "k.ptx"), Path(work, "k.cubin")
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        ptxas = subprocess.run([str(tools / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o",
                                str(Path(work, "v.cubin"))], capture_output=True, text=True)
        sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True)
    usage = ptxas.stderr
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", usage)]
    registers = re.findall(r"Used (\d+) registers", usage)
    print(json.dumps({
        "precision": args.precision, "d": args.d, "k": args.k, **GPU_TILES[args.precision],
        "ptx_wgmma": kernel.asm["ptx"].count("wgmma.mma_async"),
        "sass_hgmma": sass.stdout.count("HGMMA"),
        "registers": int(registers[0]) if registers else None,
        "spill_bytes": sum(spills) if spills else None,
        "ptxas_ok": ptxas.returncode == 0, "cuobjdump_ok": sass.returncode == 0,
    }))


if __name__ == "__main__":
    main()
