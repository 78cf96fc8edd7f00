"""A synthetic run of the real shape (prompts x samples x dims) with the structure that matters.

Rows look like hidden states: a large shared mean, anisotropic per-dimension scales, a per-prompt
offset that also predicts the prompt's difficulty (what L_Q / L_CE spend capacity on), and a weak
within-prompt direction that predicts which sample of a prompt passes (what reranking needs).
"""

from __future__ import annotations

import numpy as np


def synthetic_run(n_prompts: int = 464, n_samples: int = 16, dim: int = 896, seed: int = 0,
                  signal: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """features [P*n, d] float32, rewards [P*n] in {0, 1}, groups [P*n] (prompt index)."""
    rng = np.random.default_rng(seed)
    p_lat, s_lat = 32, 64
    scales = rng.lognormal(0.0, 0.7, dim)  # [d] anisotropic
    scales[rng.choice(dim, 4, replace=False)] *= 30.0  # a few "massive activation" dims
    base = rng.normal(0.0, 2.0, dim) * scales  # [d] shared mean
    a_prompt = rng.normal(0, 1, (p_lat, dim)) * scales / np.sqrt(p_lat) * 2.0  # [p_lat, d]
    a_sample = rng.normal(0, 1, (s_lat, dim)) * scales / np.sqrt(s_lat)  # [s_lat, d]
    u = rng.normal(0, 1, (n_prompts, p_lat))  # [P, p_lat] prompt latents
    difficulty = u @ rng.normal(0, 1, p_lat) / np.sqrt(p_lat) * 1.5 - 1.0 + rng.normal(0, 0.7, n_prompts)  # [P]
    e = rng.normal(0, 1, (n_prompts, n_samples, s_lat))  # [P, n, s_lat] sample latents
    w_sig = rng.normal(0, 1, s_lat) / np.sqrt(s_lat)  # within-prompt signal direction in latent space
    quality = e @ w_sig  # [P, n] ~ N(0, 1)
    logit = difficulty[:, None] + signal * quality + rng.normal(0, 1.0, (n_prompts, n_samples))
    rewards = (rng.random((n_prompts, n_samples)) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    x = base + (u @ a_prompt)[:, None, :] + e @ a_sample  # [P, n, d]
    x += rng.normal(0, 1, x.shape) * scales * 0.7  # isotropic-in-scale noise
    groups = np.repeat(np.arange(n_prompts), n_samples)
    return x.reshape(-1, dim).astype(np.float32), rewards.reshape(-1), groups
