#!/usr/bin/env bash
# Run HERE (not on the device machine), once per session: put the wheels gpu_check.sh needs into .whl/ (ignored by
# git, carried to the device machine with `carry: [".whl"]`). The device image has torch, triton, numpy, peft,
# accelerate, pyarrow, ...; it lacks DeepSpeed, math-verify, datasets, pydantic and has an older transformers.
#     bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for p in hjson pydantic pydantic-core annotated-types typing-inspection math-verify==0.9.0 latex2sympy2_extended \
         antlr4-python3-runtime==4.13.2 datasets==5.2.0 dill multiprocess transformers==5.19.0; do
  python3 -m pip download -q --no-deps "${plat[@]}" -d .whl "$p"
done
# DeepSpeed ships as an sdist only: build its pure-python wheel (no ops compiled) with the project's venv
ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || \
  DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
du -sh .whl
