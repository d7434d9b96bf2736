# Two commands for a fresh machine: `make demo` (main job on built-in data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo digits image-tasks rehearsal test test-fast bench

# Creates the environment if missing. The torch pin matches the wheels cached on the project's CI
# machines; elsewhere pip falls back to the newest torch that pyproject allows (torch>=2.6).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The whole pipeline on the built-in shapes; every stage resumes or skips when its output is there.
demo: venv
	$(BIN)/python main.py +experiment=shapes_autoencoder
	$(BIN)/python main.py +experiment=shapes_autoencoder task=cache_latents
	$(BIN)/python main.py +experiment=shapes_txt2img_dit
	$(BIN)/python main.py +experiment=shapes_txt2img_dit task=sample
	$(BIN)/python main.py +experiment=shapes_txt2img_dit task=sample task.grid=sampler_x_steps
	$(BIN)/python main.py +experiment=shapes_txt2img_dit task=evaluate

# Class-conditional pipeline on scikit-learn's real digits, same stages as the demo.
digits: venv
	$(BIN)/python main.py +experiment=digits_autoencoder
	$(BIN)/python main.py +experiment=digits_autoencoder task=cache_latents
	$(BIN)/python main.py +experiment=digits_class2img
	$(BIN)/python main.py +experiment=digits_class2img task=sample
	$(BIN)/python main.py +experiment=digits_class2img task=evaluate

# Inpainting, 4x super-resolution and layout-to-image on the shapes, each scored against its trivial baseline
# (blurred fill, bicubic, an all-black image): eval/image_task.json and image_task.png in each run directory.
image-tasks: venv
	$(BIN)/python main.py +experiment=shapes_autoencoder
	for task in shapes_sr shapes_layout shapes_inpaint; do \
		$(BIN)/python main.py +experiment=$$task && $(BIN)/python scripts/image_tasks.py experiments/$$task || exit 1; \
	done

# The txt2img path on a CPU, shaped like a cluster run (scripts/rehearsal/run.py): img2dataset shards with bad
# members, 2-process caching, a 2-rank DDP fit killed and resumed, sample, evaluate. The test suite runs it CI-sized.
rehearsal: venv
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python scripts/rehearsal/run.py --size full

test: venv
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q tests

test-fast: venv
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m "not slow" tests

bench: venv
	$(BIN)/python benchmarks/bench_latent_cache.py
	$(BIN)/python benchmarks/bench_train.py
