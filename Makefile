# sft — `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
SFT := $(VENV)/bin/sft
# This machine has a CPU build of torch on local disk; on a GPU machine set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install demo demo-digits demo-gpt demo-chat demo-preference demo-tasks demo-translate demo-speech speech-data demo-diffusion digits-gen test test-fast lint format bench digits clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,sweep,trackers]"
	touch $@

install: $(VENV)/.installed  ## Create .venv and install sft with everything it needs

demo: install  ## Fine-tune the embedded MiniLM on the quickstart data, then evaluate it
	$(SFT) finetune recipes/quickstart.yaml --overwrite
	$(SFT) eval recipes/quickstart.yaml

digits: install  ## Write scikit-learn's digits as an image folder (data/digits, 80/20 split)
	test -d data/digits/test || $(PY) scripts/make_digits.py data/digits

demo-digits: digits  ## Train a small ResNet from scratch on the digits images, then evaluate it
	$(SFT) finetune recipes/digits/resnet.yaml --overwrite
	$(SFT) eval recipes/digits/resnet.yaml

digits-gen: install  ## Write scikit-learn's digits upscaled to 16x16 for image generation (data/digits-gen)
	test -d data/digits-gen/test || $(PY) scripts/make_digit_images.py data/digits-gen --size 16 --per-class 10

demo-diffusion: digits-gen  ## Pretrain a diffusion UNet on unlabelled digits, fine-tune it class-conditionally on 100 labelled ones, and the same from scratch; FID and class accuracy of both
	$(SFT) finetune recipes/diffusion/classifier.yaml --overwrite
	$(SFT) pretrain recipes/diffusion/pretrain.yaml --overwrite
	$(SFT) eval recipes/diffusion/pretrain.yaml
	$(SFT) finetune recipes/diffusion/finetune.yaml --overwrite
	$(SFT) eval recipes/diffusion/finetune.yaml
	$(SFT) finetune recipes/diffusion/scratch.yaml --overwrite
	$(SFT) eval recipes/diffusion/scratch.yaml

demo-gpt: install  ## Pretrain the tiny GPT-2, then SFT it (and the from-scratch control), evaluating both
	$(SFT) pretrain recipes/tiny-gpt/pretrain.yaml --overwrite
	$(SFT) eval recipes/tiny-gpt/pretrain.yaml
	$(SFT) finetune recipes/tiny-gpt/sft.yaml --overwrite
	$(SFT) eval recipes/tiny-gpt/sft.yaml
	$(SFT) finetune recipes/tiny-gpt/sft.yaml backbone.from_scratch=true output.dir=runs/tiny-gpt-sft-scratch --overwrite
	$(SFT) eval recipes/tiny-gpt/sft.yaml backbone.from_scratch=true output.dir=runs/tiny-gpt-sft-scratch

demo-chat: install  ## Pretrain a small Llama, chat-tune it on multi-turn conversations (and the train_on=all control), evaluate both
	$(SFT) pretrain recipes/chat/pretrain.yaml --overwrite
	$(SFT) eval recipes/chat/pretrain.yaml
	$(SFT) finetune recipes/chat/sft.yaml --overwrite
	$(SFT) eval recipes/chat/sft.yaml
	$(SFT) finetune recipes/chat/sft.yaml loss.train_on=all output.dir=runs/chat-sft-all --overwrite
	$(SFT) eval recipes/chat/sft.yaml loss.train_on=all output.dir=runs/chat-sft-all

demo-preference: install  ## DPO (+ the chosen reply's NLL) on the chat demo's SFT model with pairs from its own data, and plain DPO as the control; reward accuracy and generation before and after
	@test -f runs/chat-sft/model/config.json || $(MAKE) demo-chat
	$(SFT) eval recipes/preference/dpo.yaml --model runs/chat-sft/model output.dir=runs/chat-dpo-before
	$(SFT) finetune recipes/preference/dpo.yaml --overwrite
	$(SFT) eval recipes/preference/dpo.yaml
	$(SFT) finetune recipes/preference/dpo.yaml loss.sft_weight=0 output.dir=runs/chat-dpo-only --overwrite
	$(SFT) eval recipes/preference/dpo.yaml loss.sft_weight=0 output.dir=runs/chat-dpo-only

demo-tasks: install  ## Fine-tune MiniLM for sentence pairs, regression, multi-label, NER and QA; evaluate each
	for task in pairs regression multi-label ner qa; do \
		$(SFT) finetune recipes/tasks/$$task.yaml --overwrite && $(SFT) eval recipes/tasks/$$task.yaml || exit 1; \
	done

demo-translate: install  ## Pretrain a small T5 (span corruption), fine-tune it to translate English -> Spanish, and the same fine-tune from scratch; evaluate both
	$(SFT) pretrain recipes/translate/pretrain.yaml --overwrite
	$(SFT) eval recipes/translate/pretrain.yaml
	$(SFT) finetune recipes/translate/finetune.yaml --overwrite
	$(SFT) eval recipes/translate/finetune.yaml
	$(SFT) finetune recipes/translate/finetune.yaml backbone.from_scratch=true output.dir=runs/translate-en-es-scratch --overwrite
	$(SFT) eval recipes/translate/finetune.yaml backbone.from_scratch=true output.dir=runs/translate-en-es-scratch

speech-data: install  ## Synthesize the speech clips with espeak-ng (data/speech: 1,200 train / 200 test; installs espeak-ng on Debian if missing)
	command -v espeak-ng >/dev/null || (apt-get install -y -q espeak-ng || (apt-get update -q && apt-get install -y -q espeak-ng))
	test -f data/speech/test.jsonl || $(PY) scripts/make_speech.py data/speech

demo-speech: speech-data  ## Train a small CTC speech recognizer from scratch on espeak-ng speech; WER and CER on unseen voices
	$(SFT) finetune recipes/speech/ctc.yaml --overwrite
	$(SFT) eval recipes/speech/ctc.yaml

test: install  ## Run the whole test suite (unit + integration), each test file on one of two workers
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20

test-fast: install  ## Unit tests only
	$(PY) -m pytest -q -m "not integration"

lint: install  ## ruff lint + format check + the layering contract (tests/unit/test_architecture.py)
	$(VENV)/bin/ruff check sft_cli tests benchmarks scripts
	$(VENV)/bin/ruff format --check sft_cli tests benchmarks scripts
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_architecture.py

format: install  ## Apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix sft_cli tests benchmarks scripts
	$(VENV)/bin/ruff format sft_cli tests benchmarks scripts

bench: install  ## Benchmark sft against the Hugging Face Trainer and TRL (writes benchmarks/RESULTS.md)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run.py

clean:  ## Remove run outputs (keeps .venv)
	rm -rf runs .pytest_cache
