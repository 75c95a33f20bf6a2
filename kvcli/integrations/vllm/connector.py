"""KvcliConnector: vLLM's v1 KV connector over a kvcli store (docs/vllm.md).

Scheduler side: one prefix-index lookup per request finds the longest stored prefix of its prompt, and claims it
in whole blocks, never the prompt's last token (vLLM must compute at least one); under a `deadline`, at the level
that fits the time left, or not at all where computing the prompt is sooner (deadline.py). It also picks the
prompts worth saving: those with a full 256-token chunk the store does not hold yet at one of the levels saved.
Worker side: loads run on background threads, layer by layer, straight into the request's blocks
(loading.py); saves copy the prompt's KV out of the blocks during the step that completes the prompt and hand the
copy to the background saver (saving.py). A load that fails for any reason reports its blocks through
get_block_ids_with_load_errors, and vLLM recomputes them: the cache tier never fails a request, so the connector
sets vLLM's kv_load_failure_policy to "recompute".
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from ...container import kvfile
from ...container.keys import CHUNK_TOKENS
from . import deadline as plans
from . import paged
from .engine_identity import model_identity
from .loading import DeadlineSpec, Loader, LoadJob, PagedTarget
from .saving import Saver, SaveJob, save_codec
from .settings import Settings
from .stats import STATS
from .store_access import LocalCopies, claimable, file_opener, lookup, open_connector_store

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)
_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


@dataclass
class LoadSpec:
    req_id: str
    file_key: str
    token_ids: list[int]  # the prompt's first `end` tokens
    start: int
    end: int
    block_ids: list[int]
    deadline: DeadlineSpec | None = None


@dataclass
class SaveSpec:
    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class KvcliConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    step_tokens: int = 0  # tokens the step computes: a step that loads nothing measures the prefill rate


@dataclass
class _Plan:
    """What the scheduler side knows of a request between its lookup and the step that runs it."""

    prompt: list[int]
    hits: list = field(default_factory=list)  # the index's PrefixHits: every file holding the longest stored prefix
    local: int = 0  # tokens vLLM's own prefix cache had when it last asked
    load: tuple[int, int] | None = None  # [start, end) to load, once blocks are allocated
    save_tokens: list[int] | None = None  # the prompt, if it is to be saved
    block_ids: list[int] = field(default_factory=list)
    seen: float = 0.0  # time.time() when the scheduler first saw the request: its deadline counts from there
    latency_s: float = 0.0  # the lookup's time
    claim: Any = None  # under a deadline, deadline.Claim
    counted: bool = False

    @property
    def hit(self):
        """The file a load reads: the best of the hits (exact copies first, then the finer presets)."""
        return self.hits[0] if self.hits else None


class KvcliConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = self._kv_transfer_config
        self.settings = Settings.from_extra(config.kv_connector_extra_config)
        # A cache tier must never fail a request: a failed load is recomputed (vLLM's default is to fail it).
        config.kv_load_failure_policy = "recompute"
        self.block_size = vllm_config.cache_config.block_size
        self.model_dir = str(vllm_config.model_config.model)
        self.dtype = kvfile.DTYPE_NAMES.get(vllm_config.model_config.dtype)
        self.enabled = self._usable(vllm_config)
        self.identity = self._identity() if self.enabled else None
        self.enabled = self.identity is not None
        self.store = open_connector_store(self.settings)
        self._plans: dict[str, _Plan] = {}
        self._loader: Loader | None = None
        self._saver: Saver | None = None
        self._jobs: list[LoadJob] = []
        self._copies: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._deadline = 0.0
        self._speeds = self._engine_speeds(vllm_config) if self.enabled and self.settings.deadline else None
        self._step_began = 0.0
        self._warned_deadline = False
        # The scheduler and the worker may be different processes: each writes its own file.
        self._stats_path = None
        if self.settings.stats_dir:
            role_name = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
            self._stats_path = str(Path(self.settings.stats_dir) / f"{role_name}.json")

    def _usable(self, vllm_config) -> bool:
        """Whether this engine's KV is something kvcli files can hold; if not, the connector stays out of the way."""
        why = None
        cache_dtype = vllm_config.cache_config.cache_dtype
        if self.dtype is None:
            why = f"model dtype {vllm_config.model_config.dtype}"
        elif cache_dtype not in ("auto", None) and str(cache_dtype) != str(vllm_config.model_config.dtype):
            why = f"a quantized KV cache ({cache_dtype})"
        elif vllm_config.parallel_config.tensor_parallel_size > 1 or vllm_config.parallel_config.pipeline_parallel_size > 1:
            why = "tensor or pipeline parallelism"
        elif self._kv_cache_config is not None and len(self._kv_cache_config.kv_cache_groups) > 1:
            why = "several KV cache groups (hybrid or sliding-window attention)"
        if why:
            logger.warning("kvcli connector disabled: %s is not supported", why)
        return why is None

    def _identity(self) -> dict | None:
        try:
            return model_identity(self.model_dir)
        except Exception as err:  # a hub id, a model without safetensors, a damaged file: serve without the tier
            logger.warning("kvcli connector disabled: cannot identify the model %s: %s", self.model_dir, err)
            return None

    def _engine_speeds(self, vllm_config) -> plans.EngineSpeeds | None:
        """This engine's speeds for deadline loads; without them (a model whose size cannot be read) loads claim
        as they do without a deadline."""
        model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
        device = str(vllm_config.device_config.device_type)
        try:
            self.elements_per_token = (model_config.get_num_layers(parallel) * model_config.get_num_kv_heads(parallel)
                                       * 2 * model_config.get_head_size())
            prior = plans.prefill_prior(self.model_dir, _read_config(self.model_dir), device)
        except Exception as err:
            logger.warning("kvcli connector: loads ignore the deadline: %s: %s", type(err).__name__, err)
            return None
        return plans.EngineSpeeds(plans.speeds_name(self.identity, device, self.dtype), prior)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a later cache miss, nothing more

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.enabled or not request.prompt_token_ids:
            return 0, False
        plan = self._plans.get(request.request_id)
        if plan is None:
            prompt, seen, began = list(request.prompt_token_ids), time.time(), time.perf_counter()
            hits = lookup(self.store, self.identity, self.dtype, prompt, STATS)
            plan = self._plans[request.request_id] = _Plan(prompt, hits, seen=seen,
                                                           latency_s=time.perf_counter() - began)
        plan.local = num_computed_tokens
        tokens = claimable(plan.hit, len(plan.prompt), self.block_size, num_computed_tokens)
        plan.claim = None  # vLLM may ask again (its own prefix cache, the time left may have changed): claim afresh
        if self._speeds is None or tokens == 0:
            return tokens, False
        return self._claim(plan, num_computed_tokens, num_computed_tokens + tokens), False

    def _claim(self, plan: _Plan, start: int, end: int) -> int:
        """Under a deadline: tokens [start, end) at the level that fits the time left, or none (deadline.choose)."""
        left = plan.seen + self.settings.deadline - time.time()
        plan.claim = plans.claim(plan.hits, self.store.url, plan.latency_s, self._speeds.current(),
                                 self.elements_per_token, self.settings.min_quality, len(plan.prompt), start, end, left)
        return plan.claim.end - start

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        plan = self._plans.get(request.request_id)
        if plan is not None and num_external_tokens > 0:
            plan.load = (plan.local, plan.local + num_external_tokens)
        if plan is not None and plan.claim is not None and not plan.counted:
            plan.counted = True
            claim = plan.claim
            STATS.add(f"deadline_level_{claim.level.quality}" if claim.level else "deadline_text_fallback")
            if not claim.meets:
                STATS.add("deadline_unmeetable")
                if not self._warned_deadline:
                    self._warned_deadline = True
                    logger.warning("kvcli connector: a deadline of %g s cannot be met at min_quality %s nor by "
                                   "computing the prompt; taking the fastest path (counted as deadline_unmeetable)",
                                   self.settings.deadline, self.settings.min_quality)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvcliConnectorMetadata(step_tokens=scheduler_output.total_num_scheduled_tokens)
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            plan = self._plans.get(new.req_id)
            if plan is None:
                continue
            plan.block_ids = list(new.block_ids[0])
            self._emit_load(new.req_id, plan, meta)
            if self._worth_saving(plan):
                plan.save_tokens = plan.prompt
            self._emit_save(new.req_id, plan, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            plan = self._plans.get(req_id)
            if plan is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # preempted and back: its blocks are all new, a load runs again
                plan.block_ids = list(new_blocks[0]) if new_blocks else []
                self._emit_load(req_id, plan, meta)
            elif new_blocks:
                plan.block_ids.extend(new_blocks[0])
            self._emit_save(req_id, plan, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta)
        STATS.flush(self._stats_path)
        return meta

    def _emit_load(self, req_id: str, plan: _Plan, meta: KvcliConnectorMetadata) -> None:
        if plan.load is None or plan.hit is None:
            return
        start, end = plan.load
        file_key, deadline = plan.hit.file_key, None
        if plan.claim is not None and plan.claim.level is not None:
            file_key = plan.claim.level.file_key
            deadline = DeadlineSpec(plan.seen + self.settings.deadline, len(plan.prompt),
                                    tuple(plans.levels_of(plan.hits, self.settings.min_quality)),
                                    plan.claim.level.quality, plan.latency_s)
        meta.loads.append(LoadSpec(req_id, file_key, plan.prompt[:end], start, end, list(plan.block_ids), deadline))
        plan.load = None

    def _worth_saving(self, plan: _Plan) -> bool:
        """A prompt with a full chunk the store does not hold yet at one of the levels saved (the index serves whole
        chunks only)."""
        full = len(plan.prompt) // CHUNK_TOKENS * CHUNK_TOKENS
        if not self.settings.saves or full == 0:
            return False
        if plan.hit is None or plan.hit.tokens < full:
            return True
        return bool(set(self.settings.qualities) - {hit.quality for hit in plan.hits})

    def _emit_save(self, req_id: str, plan: _Plan, computed: int, meta: KvcliConnectorMetadata) -> None:
        """Once the step that computes the prompt's last token is scheduled, its KV is complete after that step."""
        if plan.save_tokens is not None and computed >= len(plan.save_tokens):
            needed = -(-len(plan.save_tokens) // self.block_size)
            meta.saves.append(SaveSpec(req_id, plan.save_tokens, plan.block_ids[:needed]))
            plan.save_tokens = None

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        return False, None  # saves copy the KV out during the step, so vLLM may free the blocks now

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        if not self.enabled:
            return
        try:
            self._register(kv_caches)
        except Exception as err:
            self.enabled = False
            logger.warning("kvcli connector disabled: %s: %s", type(err).__name__, err)

    def _register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention.attention import Attention

        names = sorted(kv_caches, key=_layer_number)
        attention = get_layers_from_vllm_config(self._vllm_config, Attention, names)
        backends = {layer.attn_backend.get_name() for layer in attention.values()}
        if len(backends) != 1:
            raise paged.LayoutError(f"one attention backend expected, found {sorted(backends) or 'none'}")
        layout = paged.layout_of(backends.pop())
        model_config = self._vllm_config.model_config
        heads = model_config.get_num_kv_heads(self._vllm_config.parallel_config)
        head_dim = model_config.get_head_size()
        layers = [kv_caches[name] for name in names]
        if layout == "cpu":
            _check_cpu_kernels(model_config.dtype, layers[0].shape[2], head_dim,
                               self._vllm_config.cache_config.cache_dtype)
        target = PagedTarget(layers, layout, self.block_size, heads, head_dim, head_dim, model_config.dtype)
        self._layer_of = {name: i for i, name in enumerate(names)}
        self._target = target
        self._opener = file_opener(self.store, self.settings, STATS)
        self._loader = Loader(self.store, self.identity, target, STATS, self.settings.max_loads,
                              self.settings.load_timeout_s, self._opener, _decode_backend(layers[0].device),
                              self._speeds)
        if self.settings.saves:
            config = _read_config(self.model_dir)
            codecs = {q: save_codec(q, self.identity, config, len(layers)) for q in self.settings.qualities}
            self._saver = Saver(self.store, codecs, self.identity, self.dtype, STATS, self.settings.max_pending_saves,
                                settled=lambda: STATS.flush(self._stats_path))
        logger.info("kvcli connector: store %s, %d layers, %s layout, saves at %s", self.settings.store,
                    len(layers), layout, self.settings.quality)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not self.enabled or self._loader is None or not isinstance(meta, KvcliConnectorMetadata) or not meta.loads:
            return
        self._deadline = time.monotonic() + self.settings.load_timeout_s
        for spec in meta.loads:
            job = LoadJob(spec.req_id, spec.file_key, spec.token_ids, spec.start, spec.end, spec.block_ids,
                          len(self._target.layers), deadline=spec.deadline)
            self._jobs.append(job)
            self._loader.start(job)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = getattr(self, "_layer_of", {}).get(layer_name)
        if layer is None:
            return
        for job in self._jobs:
            self._loader.wait_layer(job, layer, self._deadline)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if self._saver is None or not isinstance(meta, KvcliConnectorMetadata) or not meta.saves:
            return
        layer = self._layer_of.get(layer_name)
        if layer is None:
            return
        t = self._target
        for spec in meta.saves:
            where = t.where(spec.block_ids, 0, len(spec.token_ids))
            keys, values = paged.read_tokens(kv_layer, t.layout, where, t.key_dim, t.value_dim)
            self._copies.setdefault(spec.req_id, {})[layer] = (keys.cpu(), values.cpu())

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._step_began = time.perf_counter()  # vLLM binds the metadata just before the step's forward pass

    def wait_for_save(self):
        meta = self._connector_metadata
        if self._speeds is not None and isinstance(meta, KvcliConnectorMetadata) and not meta.loads:
            self._speeds.measure_step(time.perf_counter() - self._step_began, meta.step_tokens)
        if self._saver is not None and isinstance(meta, KvcliConnectorMetadata):
            for spec in meta.saves:
                copies = self._copies.pop(spec.req_id, {})
                if len(copies) != len(self._target.layers):
                    STATS.add("saves_incomplete")
                    continue
                order = range(len(copies))
                self._saver.submit(SaveJob(spec.token_ids, [copies[i][0] for i in order], [copies[i][1] for i in order]))
        STATS.flush(self._stats_path)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed: set[int] = set()
        for job in self._jobs:
            self._loader.finish(job, self._deadline)
            failed |= job.recompute_blocks(self.block_size)
        self._jobs = []
        if failed:
            STATS.add("recomputed_blocks", len(failed))
        STATS.flush(self._stats_path)
        return failed

    def shutdown(self):
        if self._saver is not None:
            self._saver.close()
        if self._loader is not None:
            self._loader.close()
            if isinstance(self._opener, LocalCopies):
                self._opener.close()
        STATS.flush(self._stats_path)


def _decode_backend(device: torch.device) -> str:
    """Triton onto a GPU's paged tensors where it is installed, else the C decoder on the CPU."""
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def _check_cpu_kernels(dtype: torch.dtype, kernel_block: int, head_dim: int, cache_dtype) -> None:
    """The CPU backend's key layout belongs to its kernel (ISA); only the measured one is addressed."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # vLLM's own choice, as its builder makes it

    isa = _get_attn_isa(dtype, kernel_block, head_dim, cache_dtype)
    if isa not in paged.CPU_ISAS:
        raise paged.LayoutError(f"the CPU attention kernels {isa!r} keep keys in a layout kvcli has not measured "
                                f"(supported: {', '.join(paged.CPU_ISAS)})")


def _layer_number(name: str) -> tuple[int, str]:
    match = _LAYER_NUMBER.search(name)
    return (int(match.group(1)) if match else -1, name)


def _read_config(directory: str) -> dict:
    from ...container.identity import read_config

    return read_config(Path(directory))
