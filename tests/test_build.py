"""The portable CPU build, what ARM servers (Grace, Graviton) compile, tried here with XDC_FAST_PORTABLE_CPU.

The x86 engines' files must compile to nothing there, so besides compiling the portable engine we link
it with the op schemas into a library of its own and check its labels in a fresh interpreter.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "c++")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CXX) is None or shutil.which("nm") is None, reason=f"needs {CXX} and nm"),
]


def compiler_flags() -> list[str]:
    includes = (*cpp_extension.include_paths(), sysconfig.get_paths()["include"])
    return ["-std=c++17", "-fPIC", "-fopenmp", "-DXDC_FAST_PORTABLE_CPU", *(f"-I{p}" for p in includes)]


def compile_object(source: str, out: Path) -> None:
    cmd = [CXX, *compiler_flags(), "-O1", "-c", str(ROOT / source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"


# What no line of ours may hold in the portable build: x86 intrinsics and their types, x86 CPU checks.
X86_CODE = re.compile(
    r"\b(_mm\d*_\w+|__m(64|128|256|512)[di]?|__builtin_ia32_\w+|__builtin_cpu_supports)\b|target\(\"avx")


def x86_lines_of_ours(source: str) -> list[str]:
    """The x86 #include directives and x86 code that our own files still contain once preprocessed with
    XDC_FAST_PORTABLE_CPU. Torch's headers include x86intrin.h themselves on x86, so the header being in
    the translation unit proves nothing, and a second #include of it is skipped without a trace in the
    include tree; g++ -dI instead keeps every #include directive, under the line markers of its file."""
    cmd = [CXX, *compiler_flags(), "-E", "-dI", str(ROOT / source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    ours = os.path.join(ROOT, "csrc") + os.sep
    current, seen, found = "", set(), []
    for line in done.stdout.splitlines():
        marker = re.match(r'# \d+ "([^"]+)"', line)
        if marker:
            current = os.path.normpath(marker.group(1))
            continue
        if not current.startswith(ours):
            continue
        seen.add(current)
        if (line.startswith("#include") and "intrin" in line) or X86_CODE.search(line):
            found.append(f"{os.path.relpath(current, ROOT)}: {line.strip()}")
    assert str(ROOT / source) in seen, "no line markers of our files: the check would prove nothing"
    return found


X86_ENGINES = ("csrc/cpu/kmeans_assign_avx2.cpp", "csrc/cpu/kmeans_assign_avx512.cpp")


def test_portable_cpu_build_has_no_x86_code_and_assigns(tmp_path):
    engine_objs = []
    for source in X86_ENGINES:
        engine_objs.append(tmp_path / Path(source).with_suffix(".o").name)
        compile_object(source, engine_objs[-1])
        symbols = subprocess.run(["nm", "--defined-only", str(engine_objs[-1])], capture_output=True, text=True,
                                 check=True)
        assert symbols.stdout.strip() == "", f"{source} should compile to nothing:\n{symbols.stdout}"

    for source in ("csrc/cpu/kmeans_kernel.cpp", *X86_ENGINES):
        assert x86_lines_of_ours(source) == []
    kernel_obj = tmp_path / "kmeans_kernel.o"
    compile_object("csrc/cpu/kmeans_kernel.cpp", kernel_obj)

    # The op schemas, so the library registers its kernels without xdc_fast._C (whose AVX2 kernels would
    # clash with them in one process).
    schema_obj = tmp_path / "kmeans.o"
    compile_object("csrc/kmeans.cpp", schema_obj)
    lib = tmp_path / "portable_ops.so"
    link = [CXX, "-shared", "-fopenmp", str(kernel_obj), *map(str, engine_objs), str(schema_obj),
            *[f"-L{p}" for p in cpp_extension.library_paths()], "-lc10", "-ltorch_cpu", "-o", str(lib)]
    subprocess.run(link, check=True, capture_output=True, text=True)

    # K = 600 spans two 512-centroid blocks, whose winners the BLAS-tile path compares by value; integer
    # features with repeated centroids make exact ties, which the lowest index wins as in torch.argmin.
    check = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        assert torch.ops.xdc_fast.cpu_assign_isas() == ["portable"], torch.ops.xdc_fast.cpu_assign_isas()
        assert torch.ops.xdc_fast.cpu_assign_isa() == "portable"

        def scores(x, c, spherical):  # [B, N, K] in float64, the value each label minimises
            x, c = x.double(), c.double()
            return -(x @ c.transpose(1, 2)) if spherical else (x[:, :, None] - c[:, None]).pow(2).sum(-1)

        torch.manual_seed(0)
        for shape in [(2, 257, 7, 600), (1, 300, 64, 17), (1, 50, 513, 1)]:
            B, N, D, K = shape
            x, c = torch.randn(B, N, D), torch.randn(B, K, D)
            for spherical in (False, True):
                labels, dist = torch.ops.xdc_fast.kmeans_assign(x, c, spherical)
                s = scores(x, c, spherical)
                best = s.min(-1).values
                chosen = s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                assert (chosen - best).le(1e-4 * (1 + best.abs())).all(), (shape, spherical)
                want = -chosen if spherical else chosen
                assert torch.allclose(dist.double(), want, rtol=1e-4, atol=1e-4), (shape, spherical)
        x = torch.randint(-3, 4, (1, 300, 16)).float()
        c = torch.randint(-3, 4, (1, 40, 16)).float().repeat(1, 15, 1)
        for spherical in (False, True):
            labels, _ = torch.ops.xdc_fast.kmeans_assign(x, c, spherical)
            assert torch.equal(labels, scores(x, c, spherical).argmin(-1)), spherical
    """)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
