#!/usr/bin/env bash
# Fetches, here (where pip reaches PyPI), the wheels that the lent GPU machine lacks for
# benchmarks/gpu_check.sh: eai-sparsify and sae-lens with every dependency that the machine's
# image does not hold (its package list: the device tool's KINDS.md, read 2026-12-06), for its
# Python 3.12. gpu_common.sh installs .whl/*.whl there; a run names .whl in `carry`.
#
#   bash benchmarks/gpu_wheels.sh      # then: run(carry=[".whl"], command="... gpu_check.sh")
set -eu
grep -qx '/.whl/' .git/info/exclude 2> /dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
WHEELS=(
  eai-sparsify==1.3.3 natsort==8.4.0 schedulefree==1.4.1
  sae-lens==6.54.12 transformer-lens==3.9.0 beartype==0.23.1 better-abc==0.0.3 datasets==5.2.0
  dill==0.4.1 multiprocess==0.70.19 fancy-einsum==0.0.3 transformers-stream-generator==0.0.5
  typeguard==4.6.1 wandb==0.31.0 cwevals==0.0.1b1 distro==1.9.0 pydantic==2.13.4
  annotated-types==0.7.0 pydantic-core==2.46.4 typing-inspection==0.4.2 sniffio==1.3.1
  opentelemetry-api==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
  googleapis-common-protos==1.76.0 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-proto==1.45.2 platformdirs==4.14.9 plotly==7.1.0 plotly-express==0.4.1
  babe==0.0.7 py2store==0.1.24 dol==0.3.100 config2py==0.1.76 i2==0.1.91
  importlib-resources==7.1.0 graze==0.1.46 nltk==3.10.4 defusedxml==0.7.1 python-dotenv==1.2.2
  simple-parsing==0.1.9 docstring-parser==0.18.0 tenacity==9.2.1
)
for wheel in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$wheel" 2> /dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$wheel"  # pure Python, published as sdist only
done
du -sh .whl  # a run carries at most 64 MiB
