# syntax=docker/dockerfile:1
# An image of this repository for remote work pools: the Vertex AI TPU workers that run
# `train-model/vertex-tpu`. `prefect deploy --name train-model/vertex-tpu` builds and pushes it
# (prefect.yaml); deployments/README.md has the commands. No Docker daemon runs on the project's
# dev/CI machines, so tests/test_packaging.py checks this file instead of building it.
#
# Base: python:3.11-slim rather than tensorflow/tensorflow. pyproject.toml pins the interpreter
# (requires-python >=3.11,<3.12) and TensorFlow (tensorflow==2.21.0); an official TensorFlow image
# brings its own Python and TensorFlow build, and its GPU flavour CUDA, which a TPU host does not
# use. The project is installed exactly as `make install` installs it (the same pip arguments,
# checked by tests/test_packaging.py), and the accelerator's TensorFlow build is layered on top,
# at the version that install resolved.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_LOGGING_EXTRA_LOGGERS=covid_data,covid_models,covid_eval,covid_registry,covid_app

# The flow code lives here; the vertex-tpu deployment's pull step sets this working directory.
WORKDIR /opt/covid-xray
COPY . .

# Editable, as `make install`: the code Prefect loads (flows/...) is this folder's.
RUN python -m pip install --quiet --upgrade pip \
 && python -m pip install --quiet -e '.[test]'

# tpu: the plain `tensorflow` wheel has no TPU runtime (its setup.py adds `libtpu` only to the
#      `tensorflow-tpu` build), so it is swapped for `tensorflow-tpu` of the same version, with
#      libtpu from Google's index. When no tensorflow-tpu of that version is published (PyPI's
#      newest was 2.20.0 when this was written), the build stops here rather than ship a TPU image
#      without a TPU runtime.
# gpu: the same TensorFlow with its CUDA libraries (`tensorflow[and-cuda]`).
# cpu: the project's install as it is.
ARG ACCELERATOR=cpu
RUN set -eu; \
    tf="$(python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')"; \
    case "$ACCELERATOR" in \
      tpu) python -m pip uninstall --yes tensorflow \
           && python -m pip install --quiet "tensorflow-tpu==$tf" \
                -f https://storage.googleapis.com/libtpu-tf-releases/index.html ;; \
      gpu) python -m pip install --quiet "tensorflow[and-cuda]==$tf" ;; \
      cpu) ;; \
      *) echo "ACCELERATOR must be tpu, gpu or cpu, not '$ACCELERATOR'" >&2; exit 1 ;; \
    esac; \
    python -c "import tensorflow as tf, flows.train_model; print('tensorflow', tf.__version__, '($ACCELERATOR)')"

# Vertex AI runs the worker's command (`prefect flow-run execute`); nothing to start by default.
CMD ["python", "-m", "prefect", "version"]
