"""The audit's measurements: how many tokens an upstream holding the weights reads back from
the rows a transform leaves, what the transform costs the model's answers, and the two
properties a keyed transform promises.

The transformed rows come from `EmbedderCore.rows`, the Embedder's own path (its dtype, its
device, the whole batch transformed at once), so the audit measures what goes upstream.
The clean answers are computed once (`prepare`) and every transform is measured against
them (`measure`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from serve_app import envs
from serve_app.config import ModelConfig, TransformConfig
from serve_app.prompts.checkpoint import (
    load_input_embeddings,
    load_tokenizer,
    read_model_spec,
    resolve_model_dir,
)
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.keyed_noise import KeyedSeeds
from serve_app.prompts.transforms import (
    GaussianNoise,
    KeyedGaussianNoise,
    PromptTransform,
    build_transform,
    describe,
)

GREEDY_TOKENS = 16
TOP_K = 5
# Rows compared with the whole matrix at once: bounds the distance matrix (rows x vocab).
_RECOVERY_CHUNK_ROWS = 256


@dataclass(frozen=True)
class TokenRecovery:
    """Fractions of the rows sent whose true token an upstream with the weights finds: the
    nearest row of the matrix by L2, by cosine, and among the 5 nearest by L2."""

    l2: float
    cosine: float
    top5: float


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
class KeyedChecks:
    """`keyed_gaussian`'s promises, checked: two prompts sharing a prefix get identical rows
    for it, and one prompt under two keys gets a different row at every position."""

    key: Literal["environment", "ephemeral"]
    identical_prefixes_identical_rows: bool
    different_keys_different_rows: bool


@dataclass(frozen=True)
class AuditResult:
    """One transform's audit; `as_json` is what `--json` prints."""

    transform: dict[str, Any]
    token_recovery: TokenRecovery
    utility: Utility
    samples: SampleSize
    keyed: KeyedChecks | None = None

    def as_json(self) -> dict[str, Any]:
        """`transform`, `token_recovery`, `utility`, `samples`, and `keyed` for keyed kinds."""
        out = asdict(self)
        if self.keyed is None:
            del out["keyed"]
        return out


@dataclass(frozen=True)
class TransformKey:
    """The `keyed_gaussian` key: the configured one, or a random one for this run alone when
    its variable is unset. Never printed."""

    value: str = field(repr=False)
    ephemeral: bool

    @classmethod
    def for_config(cls, config: TransformConfig) -> TransformKey:
        configured = envs.secret(config.key_env)
        if configured is not None:
            return cls(configured, ephemeral=False)
        return cls(secrets.token_urlsafe(32), ephemeral=True)


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


def token_recovery(rows: Sequence[torch.Tensor], prompts: Sequence[Sequence[int]],
                   weight: torch.Tensor) -> TokenRecovery:
    """What a nearest-row lookup in `weight` reads back from `rows`, against the true ids."""
    matrix = weight.float()
    unit_matrix = F.normalize(matrix, dim=1)
    sent = torch.cat(list(rows)).to(matrix.device, torch.float32)
    truth = torch.tensor([i for prompt in prompts for i in prompt], device=matrix.device)
    l2 = cosine = top5 = 0
    with torch.inference_mode():
        for start in range(0, sent.shape[0], _RECOVERY_CHUNK_ROWS):
            chunk = sent[start:start + _RECOVERY_CHUNK_ROWS]
            expected = truth[start:start + _RECOVERY_CHUNK_ROWS]
            nearest = torch.cdist(chunk, matrix).topk(TOP_K, largest=False).indices
            l2 += int((nearest[:, 0] == expected).sum())
            top5 += int((nearest == expected[:, None]).any(dim=1).sum())
            by_angle = (F.normalize(chunk, dim=1) @ unit_matrix.T).argmax(dim=1)
            cosine += int((by_angle == expected).sum())
    total = int(truth.numel())
    return TokenRecovery(l2=l2 / total, cosine=cosine / total, top5=top5 / total)


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


def _noise_scale(config: TransformConfig, weight: torch.Tensor) -> float:
    """The scale `build_transform` gives the noise kinds at `config.sigma`."""
    gaussian = build_transform(config.model_copy(update={"kind": "gaussian"}), weight)
    assert isinstance(gaussian, GaussianNoise)
    return gaussian.scale


def keyed_transform(config: TransformConfig, weight: torch.Tensor,
                    key: str) -> KeyedGaussianNoise:
    """`build_transform`'s keyed transform, with `key` in place of the configured variable."""
    return KeyedGaussianNoise(_noise_scale(config, weight), KeyedSeeds(key))


def audited_transform(config: TransformConfig, weight: torch.Tensor,
                      key: TransformKey | None) -> PromptTransform | None:
    """The transform the Embedder would build; a keyed one takes `key`, which may be
    ephemeral."""
    if config.kind == "keyed_gaussian":
        assert key is not None
        return keyed_transform(config, weight, key.value)
    return build_transform(config, weight)


def keyed_checks(config: TransformConfig, weight: torch.Tensor, key: TransformKey,
                 prompts: Sequence[Sequence[int]]) -> KeyedChecks:
    """Checks the keyed transform's promises on the sample's first prompts, each prompt in a
    request of its own as a client would send them."""
    first = list(prompts[0])
    shared = max(1, len(first) // 2)
    other = list(prompts[1]) if len(prompts) > 1 else first[::-1]
    branching = first[:shared] + other  # shares only the first `shared` positions
    core = EmbedderCore(weight, keyed_transform(config, weight, key.value))
    [rows], [branched] = core.rows([first]), core.rows([branching])
    other_key = EmbedderCore(weight, keyed_transform(config, weight, secrets.token_urlsafe(32)))
    [rekeyed] = other_key.rows([first])
    return KeyedChecks(
        key="ephemeral" if key.ephemeral else "environment",
        identical_prefixes_identical_rows=torch.equal(rows[:shared], branched[:shared]),
        different_keys_different_rows=bool((rows != rekeyed).any(dim=1).all()),
    )


def measure(model: AuditModel, clean: CleanRun, config: TransformConfig, seed: int = 0,
            key: TransformKey | None = None) -> AuditResult:
    """One transform's audit on the prepared sample. torch is seeded with `seed` first, so a
    `gaussian` run is reproducible; a keyed run without `key` reads the configured one (or
    makes an ephemeral one)."""
    if config.kind == "keyed_gaussian" and key is None:
        key = TransformKey.for_config(config)
    transform = audited_transform(config, model.weight, key)
    core = EmbedderCore(model.weight, transform, config.apply_to_client_embeds)
    torch.manual_seed(seed)
    rows = core.rows(clean.prompts)
    keyed = None
    if config.kind == "keyed_gaussian":
        assert key is not None
        keyed = keyed_checks(config, model.weight, key, clean.prompts)
    return AuditResult(
        transform=describe(config),
        token_recovery=token_recovery(rows, clean.prompts, model.weight),
        utility=utility(model, clean, rows),
        samples=clean.samples,
        keyed=keyed,
    )


def sweep_configs(config: TransformConfig, sigmas: Sequence[float]) -> list[TransformConfig]:
    """The configured noise kind at each sigma; `gaussian` when the configured kind has no
    sigma (`none`, `module`)."""
    kind = config.kind if config.kind in ("gaussian", "keyed_gaussian") else "gaussian"
    base = config.model_dump()
    return [TransformConfig.model_validate({**base, "kind": kind, "sigma": sigma})
            for sigma in sigmas]
