"""Build the one native extension, packfmt._core: Cython bindings over the plain C core in src_c/.

Environment switches:
  PACKFMT_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer (run Python with
                       LD_PRELOAD=$(gcc -print-file-name=libasan.so) to use it)
  PACKFMT_WERROR=1     turn compiler warnings into errors (CI does)
  PACKFMT_DEBUG=1      -O0 -g
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

compile_args = ["-std=gnu11", "-Wall", "-Wextra"]
link_args = []
if os.environ.get("PACKFMT_DEBUG") == "1":
    compile_args += ["-O0", "-g"]
else:
    compile_args += ["-O2"]
if os.environ.get("PACKFMT_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    compile_args += sanitize + ["-g"]
    link_args += sanitize
if os.environ.get("PACKFMT_WERROR") == "1":
    compile_args += ["-Werror"]

core = Extension(
    "packfmt._core",
    sources=["packfmt/_core.pyx"] + sorted(glob.glob("src_c/*.c")),
    include_dirs=["src_c"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    libraries=["pthread"],
)

setup(
    ext_modules=cythonize(
        [core],
        compiler_directives={"language_level": "3"},
        include_path=["."],
    ),
)
