"""Declares ebood's optional native kernel; all package metadata lives in pyproject.toml.

``ebood._native._scores`` (plain C99 + the CPython API, no torch headers) computes the logit scores
of :mod:`ebood.scores` in one read of the logits. It is optional: if no C compiler is available
the build skips it and ebood falls back to chunked torch code (same results, slower on CPU).
CPU-specific code (AVX2/FMA/F16C) is selected at run time, so the wheel is never tied to the
build machine's CPU (no ``-march=native``).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """Adds optimisation flags that only GCC/Clang-style compilers understand."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                # -fno-trapping-math lets the portable variant's branch-free loops vectorise (the kernel
                # never relies on floating-point exceptions)
                ext.extra_compile_args = ["-O3", "-std=c99", "-fno-trapping-math", *ext.extra_compile_args]
        super().build_extensions()


setup(
    ext_modules=[
        Extension("ebood._native._scores", sources=["src/ebood/_native/_scores.c"], optional=True),
    ],
    cmdclass={"build_ext": BuildExt},
)
