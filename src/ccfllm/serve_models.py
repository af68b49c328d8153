"""The request bodies of `ccfllm serve` (pydantic): what /docs shows, and what is refused as 422.

Ids are strict integers: "7" or 7.0 is refused rather than read as 7."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, never ignored


class Row(_Request):
    uid: StrictInt = Field(description="User id.")
    iid: StrictInt = Field(description="Item id; one the dataset does not hold needs a title.")
    history: list[StrictInt] | None = Field(
        None, description="Liked item ids, oldest first; default: the user's liked items in the dataset."
    )
    title: str | None = Field(None, description="The item's title, for an item the dataset does not hold.")


class ScoreRequest(_Request):
    rows: list[Row] = Field(min_length=1, description="The rows to score.")


class RecommendRequest(_Request):
    uid: StrictInt
    k: StrictInt = Field(10, ge=1, description="How many items.")
    candidates: list[StrictInt] | None = Field(None, description="Items to rank; default: every titled item.")
    exclude_seen: StrictBool = Field(True, description="Leave out items the user has a row for.")
    shortlist: StrictInt | None = Field(
        None, ge=1, description="Rank only the CF backbone's top N of the candidates (quick)."
    )
    history: list[StrictInt] | None = None


class ExplainRequest(_Request):
    uid: StrictInt
    iid: StrictInt
    history: list[StrictInt] | None = None


class RankRequest(_Request):
    uid: StrictInt
    candidates: list[StrictInt] = Field(min_length=1)
    history: list[StrictInt] | None = None
