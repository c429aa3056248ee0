"""Token accounting and the spending caps (``--max-cost``, ``--max-tokens-total``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Budget:
    price_input_per_m: float = 0.0
    price_output_per_m: float = 0.0
    max_cost: float = 0.0  # 0 = no cap
    max_tokens: int = 0  # 0 = no cap

    @property
    def capped(self) -> bool:
        return bool(self.max_tokens or self.max_cost)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input_per_m + completion_tokens * self.price_output_per_m) / 1e6

    def exceeded(self, prompt_tokens: int, completion_tokens: int) -> str | None:
        """Why no new call may start, or None. Counts the whole state dir, not just this run."""
        if not self.capped:
            return None
        used = prompt_tokens + completion_tokens
        if self.max_tokens and used >= self.max_tokens:
            return (f"token budget reached: {used:,} tokens used of ASYNCRAFT_MAX_TOKENS_TOTAL={self.max_tokens:,}; "
                    "raise it and run the same command again to continue")
        if self.max_cost:
            if not (self.price_input_per_m or self.price_output_per_m):
                return None
            spent = self.cost(prompt_tokens, completion_tokens)
            if spent >= self.max_cost:
                return (f"cost budget reached: ${spent:.4f} spent of ASYNCRAFT_MAX_COST=${self.max_cost:g}; "
                        "raise it and run the same command again to continue")
        return None
