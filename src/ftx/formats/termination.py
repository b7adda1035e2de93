"""The termination proof, format-agnostic: does every exported artifact stop where its runtime will stop it?

The most common complaint after a fine-tune ships to llama.cpp or Ollama is an answer that never ends (or ends
in gibberish): the model emits an end token the runtime does not stop on, or none at all. So each artifact
answers the held-out prompts greedily through its own runtime (Format.generate) and every answer is classified
by how it ended:

    clean        on a token of the stop set: the model's declared end tokens (generation_config / tokenizer EOS,
                 which the Modelfile's PARAMETER stop carries) that the artifact's runtime also ends on
    other token  on an end-of-generation token of the runtime outside the stop set (e.g. `<|endoftext|>` where
                 the chat template ends a turn with `<|im_end|>`: the training data taught another end)
    max_tokens   still going after `max_tokens` tokens: a runaway answer

The clean share must reach `min_clean_stop_rate` for a variant to pass the gate. When the reference (the
fine-tune itself) misses it by ending on another end-of-generation token, the export fails, or with
`other_end_token: extend` that token joins the stop set (the Modelfiles' PARAMETER stop), noted in the card.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import FtxError

RUNAWAY = "(max_tokens)"


class Termination(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: int = Field(24, ge=1, description="held-out prompts each artifact answers (greedy, chat template)")
    max_tokens: int = Field(128, ge=8, description="an answer still going after this many tokens ran away")
    min_clean_stop_rate: float = Field(
        0.95, ge=0, le=1, description="share of answers that must end on a token of the stop set"
    )
    other_end_token: Literal["fail", "extend"] = Field(
        "fail",
        description="when the fine-tune itself ends on an end-of-generation token outside the stop set: fail the "
        "export, or add the token to the stop set (the Modelfiles' PARAMETER stop), with a note",
    )


class Ends(BaseModel):
    clean_stop_rate: float
    ends: dict[str, int] = Field(description="how the answers ended: end token (or (max_tokens)) -> count")


class TerminationResult(BaseModel):
    prompts: int
    max_tokens: int
    stop_set: list[str] = Field(description="the tokens a clean answer ends on")
    declared: list[str] = Field(description="the model's declared end tokens (generation_config, tokenizer)")
    extended: list[str] = Field(default_factory=list, description="end tokens added to the stop set")
    note: str | None = None
    artifact_end_ids: list[str] = Field(
        default_factory=list, description="the reference artifact's own EOS/EOT metadata"
    )
    template_matches: bool | None = Field(
        None, description="the artifact's embedded chat template is the tokenizer's (None: it embeds none)"
    )
    files: dict[str, Ends]
    answers: dict[str, list[list[int]]] = Field(default_factory=dict, exclude=True)  # per artifact, for task metrics


def tally(answers: list[list[int]], stop: set[int], eog: dict[int, str]) -> Ends:
    """How each answer ended, and the clean share."""
    ends = Counter()
    for a in answers:
        last = a[-1] if a else None
        ends[eog.get(last, RUNAWAY)] += 1
    clean = sum(1 for a in answers if a and a[-1] in stop)
    return Ends(clean_stop_rate=clean / len(answers) if answers else 0.0, ends=dict(ends.most_common()))


def check(
    fmt,
    artifacts: list[tuple[str, object]],
    prompts: list[list[int]],
    declared: dict[int, str],
    cfg,
    tok_template: str | None,
    progress=None,
) -> TerminationResult:
    """Answer `prompts` with every artifact (reference first), classify the endings, apply the reference rule.
    `declared`: the model's end tokens {id: text}. Returns the per-artifact figures; raises FtxError when the
    reference does not stop cleanly and the settings do not let its end token join the stop set."""
    runs = {}
    eog: dict[int, str] = {}
    for name, path in artifacts:
        if progress:
            progress(f"termination: {name} answers {len(prompts)} prompts")
        answers, eog = fmt.generate(path, prompts, cfg.max_tokens)
        runs[name] = answers
    ref_name, ref_path = artifacts[0]
    meta = fmt.metadata(ref_path)
    stop = {i for i in declared if i in eog}
    ref = tally(runs[ref_name], stop, eog)
    extended, note = [], None
    if ref.clean_stop_rate < cfg.min_clean_stop_rate:
        other = {t: n for t, n in ref.ends.items() if t != RUNAWAY and t not in {eog[i] for i in stop}}
        widened = ref.clean_stop_rate + sum(other.values()) / len(prompts)
        if cfg.other_end_token == "extend" and other and widened >= cfg.min_clean_stop_rate:
            extended = list(other)
            stop |= {i for i, t in eog.items() if t in other}
            note = (
                f"the fine-tune ends on {', '.join(extended)} (not a declared end token: "
                f"{', '.join(declared.values()) or 'none'}); added to the stop set (export.termination."
                "other_end_token: extend). The training data likely ends turns with it: check the chat template."
            )
        else:
            raise FtxError(_failure(ref_name, ref, declared, eog, stop, cfg, len(prompts)))
    return TerminationResult(
        prompts=len(prompts),
        max_tokens=cfg.max_tokens,
        stop_set=sorted(eog[i] for i in stop),
        declared=list(declared.values()),
        extended=extended,
        note=note,
        artifact_end_ids=[eog.get(i, str(i)) for i in meta.get("end_ids", [])],
        template_matches=None if not meta.get("chat_template") else meta["chat_template"] == tok_template,
        files={name: tally(answers, stop, eog) for name, answers in runs.items()},
        answers=runs,
    )


def _failure(name, ref: Ends, declared: dict[int, str], eog: dict[int, str], stop: set[int], cfg, n: int) -> str:
    how = ", ".join(f"{t} {k}x" for t, k in ref.ends.items())
    missing = [t for i, t in declared.items() if i not in eog]
    hint = (
        f" The declared end token(s) {', '.join(missing)} are not end-of-generation tokens of the artifact."
        if missing
        else ""
    )
    fix = (
        " Its answers run away: train longer or check that the training data ends every turn with the template's "
        "end token."
        if ref.ends.get(RUNAWAY)
        else " The training data may end turns with another token: fix the data, or set "
        "export.termination.other_end_token=extend to add it to the stop set."
    )
    return (
        f"the {name} artifact ends only {ref.clean_stop_rate:.0%} of {n} held-out answers on the stop set "
        f"({', '.join(eog[i] for i in stop) or 'empty'}) (< export.termination.min_clean_stop_rate "
        f"{cfg.min_clean_stop_rate:.0%}); its answers ended on {how}.{hint}{fix}"
    )
