"""The audit's measurements: how many tokens the adversary reads back from the rows a
transform leaves (the attack suite, `suite`), what the transform costs the model's answers,
and the two properties a keyed transform promises.

The transformed rows come from `EmbedderCore.rows`, the Embedder's own path (its dtype, its
device, the whole batch transformed at once), so the audit measures what goes upstream.
The clean answers are computed once (`prepare`) and every transform is measured against
them (`measure`, `measure_target`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from serve_app.config import ModelConfig, TransformConfig
from serve_app.privacy.configured import (
    KeyedChecks,
    TransformKey,
    config_target,
    keyed_checks,
)
from serve_app.privacy.lookups import TokenRecovery, token_recovery
from serve_app.privacy.suite import (
    DEFAULT_OPTIONS,
    AttackResult,
    SuiteOptions,
    Victim,
    counted,
    run_suite,
    worst,
)
from serve_app.privacy.target import AuditTarget
from serve_app.prompts.checkpoint import (
    load_input_embeddings,
    load_tokenizer,
    read_model_spec,
    resolve_model_dir,
)
from serve_app.prompts.embedder import EmbedderCore

GREEDY_TOKENS = 16


@dataclass(frozen=True)
class Utility:
    """The model on transformed rows against clean ones: top-1 next-token agreement and
    mean KL(clean || transformed) over every position, and the fraction of greedy prompts
    whose 16-token continuation is the same."""

    next_token_agreement: float
    mean_kl: float
    greedy_match: float


@dataclass(frozen=True)
class SampleSize:
    """What the figures are fractions of."""

    source: str
    texts: int
    rows: int
    greedy_prompts: int
    greedy_tokens: int


@dataclass(frozen=True)
class AuditResult:
    """One transform's audit; `as_json` is what `--json` prints."""

    transform: dict[str, Any]
    token_recovery: TokenRecovery
    utility: Utility
    samples: SampleSize
    keyed: KeyedChecks | None = None
    attacks: dict[str, AttackResult] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """`transform`, `token_recovery` (with `worst`), `attacks` (worst first),
        `utility`, `samples`, and `keyed` for keyed kinds."""
        out = {"transform": self.transform, "token_recovery": asdict(self.token_recovery),
               "attacks": {name: result.as_json() for name, result in self.attacks.items()},
               "utility": asdict(self.utility), "samples": asdict(self.samples)}
        if self.keyed is not None:
            out["keyed"] = asdict(self.keyed)
        return out


@dataclass(frozen=True)
class AuditModel:
    """What the audit loads: the Embedder's matrix (the configured dtype, on `device`), the
    tokenizer, and the whole model in float32 for the utility."""

    weight: torch.Tensor
    causal_lm: Any
    tokenizer: Any

    @classmethod
    def load(cls, config: ModelConfig, device: str = "cpu") -> AuditModel:
        from transformers import AutoModelForCausalLM

        model_dir = resolve_model_dir(config)
        weight = load_input_embeddings(model_dir, read_model_spec(model_dir, config).dtype,
                                       device)
        causal_lm: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        causal_lm = causal_lm.to(device).eval()
        return cls(weight, causal_lm, load_tokenizer(model_dir))


@dataclass(frozen=True)
class CleanRun:
    """The sample's token ids and the model's answers on its untransformed rows."""

    prompts: list[list[int]]
    log_probs: list[torch.Tensor]
    continuations: list[list[int]]
    samples: SampleSize


def _answers(causal_lm: Any, rows: Sequence[torch.Tensor],
             greedy_prompts: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each prompt's next-token log-probabilities at every position, and the greedy
    continuations of the first `greedy_prompts`."""
    device = causal_lm.device
    log_probs, continuations = [], []
    with torch.inference_mode():
        for index, prompt_rows in enumerate(rows):
            out = causal_lm(inputs_embeds=prompt_rows.to(device, torch.float32)[None],
                            use_cache=index < greedy_prompts)
            log_probs.append(torch.log_softmax(out.logits[0].float(), dim=-1))
            if index < greedy_prompts:
                continuations.append(_greedy(causal_lm, out))
    return log_probs, continuations


def _greedy(causal_lm: Any, out: Any) -> list[int]:
    """`GREEDY_TOKENS` greedy tokens after the prompt `out` holds the cache of; an
    end-of-sequence token does not stop it, so every continuation has the same length."""
    tokens = []
    for _ in range(GREEDY_TOKENS):
        token = out.logits[0, -1].argmax()
        tokens.append(int(token))
        out = causal_lm(input_ids=token.view(1, 1), past_key_values=out.past_key_values,
                        use_cache=True)
    return tokens


def prepare(model: AuditModel, texts: Sequence[str], greedy_prompts: int,
            source: str = "built-in") -> CleanRun:
    """Tokenize the sample and compute the clean answers every transform is compared with;
    the first `greedy_prompts` texts are the greedy prompts."""
    if not texts or greedy_prompts < 1:
        raise ValueError("the audit needs at least one text and one greedy prompt")
    prompts = [list(model.tokenizer(text).input_ids) for text in texts]
    greedy_prompts = min(greedy_prompts, len(prompts))
    clean_rows = EmbedderCore(model.weight).lookup(prompts)
    log_probs, continuations = _answers(model.causal_lm, clean_rows, greedy_prompts)
    samples = SampleSize(source=source, texts=len(prompts), rows=sum(map(len, prompts)),
                         greedy_prompts=greedy_prompts, greedy_tokens=GREEDY_TOKENS)
    return CleanRun(prompts, log_probs, continuations, samples)


def utility(model: AuditModel, clean: CleanRun, rows: Sequence[torch.Tensor]) -> Utility:
    """The model's answers on `rows` against its answers on the clean rows."""
    log_probs, continuations = _answers(model.causal_lm, rows, len(clean.continuations))
    agreeing, kl, positions = 0, 0.0, 0
    for clean_lp, noisy_lp in zip(clean.log_probs, log_probs, strict=True):
        agreeing += int((clean_lp.argmax(dim=-1) == noisy_lp.argmax(dim=-1)).sum())
        kl += float(F.kl_div(noisy_lp, clean_lp, reduction="sum", log_target=True))
        positions += clean_lp.shape[0]
    matching = sum(a == b for a, b in zip(clean.continuations, continuations, strict=True))
    return Utility(next_token_agreement=agreeing / positions, mean_kl=kl / positions,
                   greedy_match=matching / len(continuations))


def measure(model: AuditModel, clean: CleanRun, config: TransformConfig, seed: int = 0,
            key: TransformKey | None = None,
            options: SuiteOptions = DEFAULT_OPTIONS) -> AuditResult:
    """The configured transform's audit on the prepared sample; a keyed run without `key`
    reads the configured one (or makes an ephemeral one)."""
    if config.kind == "keyed_gaussian" and key is None:
        key = TransformKey.for_config(config)
    keyed = None
    if config.kind == "keyed_gaussian":
        assert key is not None
        keyed = keyed_checks(config, model.weight, key, clean.prompts)
    target = config_target(config, model.weight, key, seed)
    return measure_target(model, clean, target, seed, options, keyed)


def measure_target(model: AuditModel, clean: CleanRun, target: AuditTarget, seed: int = 0,
                   options: SuiteOptions = DEFAULT_OPTIONS,
                   keyed: KeyedChecks | None = None) -> AuditResult:
    """One target's audit: torch is seeded with `seed` before the victim's rows and before
    each attack, so a run with fresh noise is reproducible."""
    torch.manual_seed(seed)
    victim = Victim.send(target, clean.prompts)
    attacks = run_suite(victim, replace(options, seed=seed))
    found = token_recovery(victim.rows, victim.prompts, target.host_weight)
    if counted(attacks, options):
        name, share = worst(counted(attacks, options))
        found = replace(found, worst=share, worst_attack=name)
    return AuditResult(transform=target.description, token_recovery=found,
                       utility=utility(model, clean, victim.rows), samples=clean.samples,
                       keyed=keyed, attacks=attacks)

