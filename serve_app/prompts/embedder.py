"""EmbedderCore: prompts -> input-embedding lookup -> transform -> encoded prompt embeddings.

A prompt is token ids, or segments of token ids and client tensors (`SplicedPrompt`, for
chat parts and client embeddings): ids are looked up, tensors joined in place, a request's
prompt adapter's rows put first (`adapters`), the batch is transformed on the matrix's
device (`transforms`), and every prompt is encoded for the upstream here. Plain Python
(no Ray): the Serve deployment in `deployments.py` batches calls into it, one
`EmbedRequest` per request, and records what `embed_measured` says each lookup cost as
metrics.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serve_app.config import AdapterConfig, ModelConfig, TransformConfig
from serve_app.errors import GatewayError
from serve_app.prompts.adapters import PromptAdapter, load_prompt_adapters, reload_prompt_adapters
from serve_app.prompts.checkpoint import (
    ModelSpec,
    load_input_embeddings,
    read_model_spec,
    select_device,
)
from serve_app.prompts.codec import EncodedPromptEmbeds, encode_prompt_embeds
from serve_app.prompts.tenants import SHARED_TENANT
from serve_app.prompts.transforms import PromptTransform, build_transform, client_row_contents


@dataclass(frozen=True)
class SplicedPrompt:
    """Runs of token ids with client tensors between them, embedded as one sequence.

    Chat messages carrying `prompt_embeds` parts become this: the template's text around
    each part is tokenized, and the (already validated) tensors sit where the parts were.
    A completions request's client embeddings are each one of one segment.
    """

    segments: tuple[list[int] | torch.Tensor, ...]

    @property
    def rows(self) -> int:
        return sum(len(p) if isinstance(p, list) else int(p.shape[0]) for p in self.segments)


PromptInput = Sequence[int] | SplicedPrompt
"""What the embedder takes per prompt: token ids, or ids spliced with tensors."""


@dataclass(frozen=True)
class EmbedRequest:
    """One request's prompts, in vLLM's order, its tenant (`prompts.tenants`) and the
    prompt adapter it names, if any: what the Dispatcher asks of the Embedder in one call,
    however many prompts it has."""

    prompts: tuple[PromptInput, ...]
    tenant: str = SHARED_TENANT
    adapter: str | None = None
    """`model.adapters[].name`: its virtual tokens' rows lead each of the prompts."""


def adapter_not_loaded(name: str) -> GatewayError:
    """The error of a request whose adapter this Embedder replica does not hold: one the
    ingress lists while a changed `model.adapters` reaches the replicas one by one. The
    ingress has it, so it comes back soon or the ingress stops listing it: retry."""
    return GatewayError(f"The model `{name}` (a prompt adapter) is not loaded on the "
                        "Embedder; the adapter list is changing; retry shortly.", 503,
                        param="model", code="adapter_not_loaded",
                        headers={"Retry-After": "1"})


def prompt_rows(prompt: PromptInput) -> int:
    """Rows of the prompt's embeddings: one per token id, plus the tensors' rows."""
    return prompt.rows if isinstance(prompt, SplicedPrompt) else len(prompt)


def _token_runs(prompt: PromptInput) -> list[Sequence[int]]:
    if isinstance(prompt, SplicedPrompt):
        return [p for p in prompt.segments if isinstance(p, list)]
    return [prompt]


@dataclass(frozen=True)
class BatchStats:
    """What one batch was and cost: prompts, embedding rows, seconds per stage that ran
    (lookup, transform, encode) and bytes of encoded (base64) embeddings."""

    prompts: int
    rows: int
    stage_seconds: dict[str, float]
    payload_bytes: int


class StageClock:
    """Seconds per stage of one batch, each lap ending one stage.

    On CUDA a lap records an event on the current stream instead of waiting for the
    device, so a stage's kernels count in that stage, not the next, at no cost to the
    batch: the events are read once the batch's rows are on the host (`_to_host` has
    waited for the stream), when the device has passed every one of them."""

    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._laps: list[tuple[str, float, torch.cuda.Event | None]] = []
        self._start = time.perf_counter(), self._event()

    def _event(self) -> torch.cuda.Event | None:
        if self._stream is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event

    def lap(self, stage: str) -> None:
        self._laps.append((stage, time.perf_counter(), self._event()))

    @property
    def seconds(self) -> dict[str, float]:
        """Each stage's seconds: by the device's events on CUDA, else by the host's clock."""
        seconds: dict[str, float] = {}
        last_time, last_event = self._start
        for stage, now, event in self._laps:
            if event is not None and last_event is not None:
                event.synchronize()  # passed already: the rows were copied to the host
                spent = last_event.elapsed_time(event) / 1e3
            else:
                spent = now - last_time
            seconds[stage] = seconds.get(stage, 0.0) + spent
            last_time, last_event = now, event
        return seconds


def _to_host(rows: torch.Tensor) -> torch.Tensor:
    """GPU rows into pinned host memory: a DMA at the link's rate, where a pageable copy
    is tens of times slower (H100: 2.5 ms against 101 ms for 128 MiB)."""
    if not rows.is_cuda:
        return rows
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    torch.cuda.current_stream(rows.device).synchronize()
    return host


class EmbedderCore:
    """Holds only the input-embedding matrix of the served model, and its transform."""

    def __init__(self, weight: torch.Tensor, transform: PromptTransform | None = None,
                 transform_client_embeds: bool = False,
                 adapters: dict[str, PromptAdapter] | None = None,
                 transform_adapters: bool = True, spec: ModelSpec | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError("the input-embedding weight must be (vocab, hidden)")
        self.weight = weight
        self.transform = transform
        self.transform_client_embeds = transform_client_embeds
        self.adapters: Mapping[str, PromptAdapter] = adapters or {}
        """The prompt adapters by name, their rows on the matrix's device. `set_adapters`
        replaces the mapping whole, so a batch that read it once sees one set."""
        self.transform_adapters = transform_adapters
        self.spec = spec
        """The served model's, which adapters are checked against (`set_adapters`)."""

    @classmethod
    def from_checkpoint(cls, model_dir: Path, config: ModelConfig,
                        privacy: TransformConfig | None = None) -> EmbedderCore:
        privacy = privacy or TransformConfig()
        spec = read_model_spec(model_dir, config)
        device = select_device(config.device)
        weight = load_input_embeddings(model_dir, spec.dtype, device)
        adapters = load_prompt_adapters(config.adapters, spec, weight.device)
        return cls(weight, build_transform(privacy, weight), privacy.apply_to_client_embeds,
                   adapters, privacy.apply_to_adapters, spec)

    def set_adapters(self, wanted: list[AdapterConfig]) -> None:
        """Serve the `wanted` adapters (`adapters.reload_prompt_adapters`): on a refusal
        (`AdapterError`) the loaded set stays as it was."""
        if self.spec is None:
            raise ValueError("adapters are loaded against the model's spec: build the core "
                             "with from_checkpoint")
        self.adapters = reload_prompt_adapters(self.adapters, wanted, self.spec,
                                               self.weight.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def embed_batch(self, batch: Sequence[PromptInput], tenants: Sequence[str] | None = None,
                    adapters: Sequence[str | None] | None = None) -> list[EncodedPromptEmbeds]:
        """Each prompt's rows (`rows`), encoded for the upstream."""
        return [encode_prompt_embeds(rows) for rows in self.rows(batch, tenants, adapters)]

    def embed_measured(
        self, batch: Sequence[PromptInput], tenants: Sequence[str] | None = None,
        adapters: Sequence[str | None] | None = None, *,
        loaded: Mapping[str, PromptAdapter] | None = None,
    ) -> tuple[list[EncodedPromptEmbeds], BatchStats]:
        """`embed_batch`, and what the batch cost."""
        clock = StageClock(self.weight.device)
        rows = self.rows(batch, tenants, adapters, clock=clock, loaded=loaded)
        encoded = [encode_prompt_embeds(prompt_rows) for prompt_rows in rows]
        clock.lap("encode")
        stats = BatchStats(prompts=len(batch), rows=sum(int(r.shape[0]) for r in rows),
                           stage_seconds=clock.seconds,
                           payload_bytes=sum(item.nbytes for item in encoded))
        return encoded, stats

    def embed_requests(
        self, requests: Sequence[EmbedRequest], max_prompts: int
    ) -> tuple[list[list[EncodedPromptEmbeds] | GatewayError], list[BatchStats]]:
        """Each request's prompts, encoded (`embed_measured`), and what each lookup cost.
        The requests' prompts are looked up together, at most `max_prompts` at a time: a
        batch of requests can hold many more prompts than one lookup should. A request
        naming an adapter this core does not hold gets its error in place of its prompts
        (`adapter_not_loaded`); the batch's other requests are answered."""
        loaded = self.adapters  # one set for the whole batch, whatever set_adapters does
        served = [request for request in requests
                  if request.adapter is None or request.adapter in loaded]
        prompts = [prompt for request in served for prompt in request.prompts]
        tenants = [request.tenant for request in served for _ in request.prompts]
        adapters = [request.adapter for request in served for _ in request.prompts]
        encoded: list[EncodedPromptEmbeds] = []
        stats: list[BatchStats] = []
        for start in range(0, len(prompts), max(1, max_prompts)):
            stop = start + max(1, max_prompts)
            part, cost = self.embed_measured(prompts[start:stop], tenants[start:stop],
                                             adapters[start:stop], loaded=loaded)
            encoded += part
            stats.append(cost)
        answers: list[list[EncodedPromptEmbeds] | GatewayError] = []
        for request in requests:
            if request.adapter is not None and request.adapter not in loaded:
                answers.append(adapter_not_loaded(request.adapter))
                continue
            answers.append(encoded[:len(request.prompts)])
            del encoded[:len(request.prompts)]
        return answers, stats

    def rows(self, batch: Sequence[PromptInput], tenants: Sequence[str] | None = None,
             adapters: Sequence[str | None] | None = None, *,
             clock: StageClock | None = None,
             loaded: Mapping[str, PromptAdapter] | None = None) -> list[torch.Tensor]:
        """What goes upstream: each prompt's rows, transformed; one CPU tensor per prompt.

        `tenants` names each prompt's tenant, in the batch's order (`prompts.tenants`:
        `api_key_tenant(key)`, or `SHARED_TENANT`); None puts every prompt in the shared
        one. Only a keyed transform reads them. `adapters` names each prompt's prompt
        adapter (or None), whose rows go first, from `loaded` (by default the core's
        adapters). With a `clock`, the lookup and transform stages are timed on it."""
        tenants = [SHARED_TENANT] * len(batch) if tenants is None else list(tenants)
        if len(tenants) != len(batch):
            raise ValueError("rows() takes one tenant per prompt")
        leads = self._leads(adapters, len(batch), self.adapters if loaded is None else loaded)
        if self.transform is None or not any(map(self._transforms, batch, leads)):
            looked_up = self.lookup(batch, leads)
            if clock:
                clock.lap("lookup")
            return looked_up
        runs = [run for prompt in batch for run in _token_runs(prompt)]
        with torch.inference_mode():
            ids = self._device_ids(runs)
            flat = torch.nn.functional.embedding(ids, self.weight)
            if clock:
                clock.lap("lookup")
            if all(not isinstance(prompt, SplicedPrompt) and lead is None
                   for prompt, lead in zip(batch, leads, strict=True)):
                lengths = [prompt_rows(prompt) for prompt in batch]
                transformed = self.transform(flat, ids, lengths, tenants)
                out = list(_to_host(transformed).split(lengths))
            else:
                out = self._spliced_rows(batch, tenants, leads,
                                         iter(flat.split([len(run) for run in runs])))
        if clock:
            clock.lap("transform")
        return out

    @staticmethod
    def _leads(adapters: Sequence[str | None] | None, prompts: int,
               loaded: Mapping[str, PromptAdapter]) -> list[PromptAdapter | None]:
        """Each prompt's adapter, by its name."""
        if adapters is None:
            return [None] * prompts
        if len(adapters) != prompts:
            raise ValueError("rows() takes one adapter (or None) per prompt")
        unknown = sorted({name for name in adapters if name and name not in loaded})
        if unknown:
            raise ValueError(f"no prompt adapter named {', '.join(unknown)} is loaded")
        return [loaded[name] if name else None for name in adapters]

    def _transforms(self, prompt: PromptInput, lead: PromptAdapter | None = None) -> bool:
        """Whether the transform changes any of this prompt's rows."""
        return (self.transform_client_embeds or bool(_token_runs(prompt))
                or (lead is not None and self.transform_adapters))

    def _spliced_rows(self, batch: Sequence[PromptInput], tenants: Sequence[str],
                      leads: Sequence[PromptAdapter | None],
                      looked_up: Iterator[torch.Tensor]) -> list[torch.Tensor]:
        """Prompts with client tensors or an adapter: each prompt's rows joined on the
        device, the batch transformed at once, and client and adapter rows put back where
        they stay as they are."""
        parts: list[torch.Tensor] = []
        positions: list[list[int]] = []
        kept: list[tuple[int, torch.Tensor]] = []  # (start row, rows left as they are)
        start = 0
        for prompt, lead in zip(batch, leads, strict=True):
            segments = prompt.segments if isinstance(prompt, SplicedPrompt) else [prompt]
            content: list[int] = []
            if lead is not None:
                parts.append(lead.rows)
                content += lead.contents
                if not self.transform_adapters:
                    kept.append((start, lead.rows))
                start += lead.virtual_tokens
            for segment in segments:
                if isinstance(segment, torch.Tensor):
                    rows = segment.to(self.weight.device, self.dtype)
                    content += client_row_contents(segment)
                    if not self.transform_client_embeds:
                        kept.append((start, rows))
                else:
                    rows = next(looked_up)
                    content += segment
                parts.append(rows)
                start += int(rows.shape[0])
            positions.append(content)
        assert self.transform is not None
        lengths = [len(p) for p in positions]
        flat = torch.tensor([c for p in positions for c in p], dtype=torch.int64)
        out = self.transform(torch.cat(parts), flat.to(self.weight.device), lengths, tenants)
        for row, rows in kept:
            out[row:row + rows.shape[0]] = rows
        return list(_to_host(out).split(lengths))

    def lookup(self, batch: Sequence[PromptInput],
               leads: Sequence[PromptAdapter | None] | None = None) -> list[torch.Tensor]:
        """The rows before any transform: one lookup for the whole batch; one CPU tensor
        per prompt, after its adapter's rows where `leads` names one.

        Plain token-id prompts come back as views of one copy; spliced prompts are joined
        with their tensors, cast to the model's dtype.
        """
        runs = [run for prompt in batch for run in _token_runs(prompt)]
        looked_up = iter(_to_host(self._device_rows(runs)).split([len(r) for r in runs])
                         if runs else [])
        out = []
        for prompt, lead in zip(batch, leads or [None] * len(batch), strict=True):
            if not isinstance(prompt, SplicedPrompt) and lead is None:
                out.append(next(looked_up))
                continue
            segments = prompt.segments if isinstance(prompt, SplicedPrompt) else (prompt,)
            rows = [] if lead is None else [lead.rows.cpu()]
            rows += [segment.to(self.dtype) if isinstance(segment, torch.Tensor)
                     else next(looked_up) for segment in segments]
            # A client tensor alone is encoded as it is: joining one segment would copy it.
            out.append(rows[0] if len(rows) == 1 else torch.cat(rows))
        return out

    def _device_ids(self, runs: list[Sequence[int]]) -> torch.Tensor:
        """Every run's token ids, joined, on the matrix's device. numpy reads the Python
        ints about four times faster than `torch.tensor` on a list (a fifth of the
        Embedder's Python time at 2048 tokens went there)."""
        count = sum(map(len, runs))
        flat = np.fromiter(itertools.chain.from_iterable(runs), dtype=np.int64, count=count)
        return torch.from_numpy(flat).to(self.weight.device, non_blocking=True)

    def _device_rows(self, runs: list[Sequence[int]]) -> torch.Tensor:
        """One embedding lookup for every run of token ids, on the matrix's device."""
        with torch.inference_mode():
            return torch.nn.functional.embedding(self._device_ids(runs), self.weight)
