"""``speculative:`` in the engine config (and so in the Serve config): vLLM's names where they exist."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpeculativeConfig(BaseModel):
    """Speculative decoding in the paged engine (vLLM's ``--speculative-config``); off when absent."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: Literal["ngram", "draft"] = Field(
        "ngram", description="ngram: prompt lookup in the row's own prompt and output (no extra model); draft: a "
                             "small draft model with the target's tokenizer (draft_model).")
    draft_model: Optional[str] = Field(None, description="method draft: the draft model (path, cache name or hub id).")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="Most tokens drafted a row and step (K).")
    prompt_lookup_min: int = Field(2, ge=1, le=16, description="ngram: the shortest suffix n-gram matched.")
    prompt_lookup_max: int = Field(4, ge=1, le=16, description="ngram: the longest suffix n-gram matched.")
    auto: bool = Field(True, description="Let the controller choose K (or none) per row and step from measured "
                                         "acceptance and verify cost; false: always draft num_speculative_tokens.")

    @model_validator(mode="after")
    def _check(self) -> "SpeculativeConfig":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("method 'draft' needs draft_model")
        if self.method == "ngram" and self.draft_model:
            raise ValueError("draft_model goes with method 'draft'")
        return self
