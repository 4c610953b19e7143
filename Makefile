# The two set-up commands of the README: `make demo` (install + the whole pipeline on smollm2-135m)
# and `make test` (install + the test suite). Both create or reuse .venv.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo
# llama.cpp's native build uses AMX kernels that crash some x86 CPUs ("Illegal instruction")
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
export OMP_WAIT_POLICY ?= PASSIVE
# llama-cpp-python compiles llama.cpp at install (minutes): use every core
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[deploy,kernels,test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/edgeft train --model smollm2-135m --data builtin:tasks --qat phone-deployment --max-steps 60 --out $(RUN) --overwrite
	$(BIN)/edgeft export pte --run $(RUN)
	$(BIN)/edgeft export gguf --run $(RUN)
	$(BIN)/edgeft export torchao --run $(RUN)
	$(BIN)/edgeft eval --run $(RUN) --limit 30

# two workers: each test runs on one torch thread (tests/conftest.py), so one process leaves a core idle;
# --dist loadfile keeps a file's module fixtures (trained runs, exports) in one worker
# ruff first (format + lint: the shape CI keeps), then the suite; tests/test_layout.py checks the import boundaries
test: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) .cache runs
