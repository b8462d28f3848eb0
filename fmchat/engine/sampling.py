"""Next-token sampling, done on the tensor side: greedy, temperature and top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    seed: int | None = None  # None = a fresh random seed per session


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.generator: torch.Generator | None = None  # made on the device of the first logits

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            if self.config.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.config.seed)
        return self.generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """A 0-d tensor holding the next token id (no host sync here)."""
        cfg = self.config
        if cfg.temperature <= 0:
            return torch.argmax(logits)
        gen = self._generator(logits.device)
        probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
        if 0 < cfg.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            sorted_probs = sorted_probs.masked_fill(cum - sorted_probs >= cfg.top_p, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=gen)
            return order[choice[0]]
        return torch.multinomial(probs, 1, generator=gen)[0]
