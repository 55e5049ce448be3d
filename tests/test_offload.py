"""Vision-encoder weight streaming: identical outputs with and without it, and the schedule's
invariants checked with an instrumented fake stream that runs copies and computes lazily, in a
random interleaving, as a GPU would (a layer never computes before its copy completed; a slot is
never overwritten while a computation reading it may still run)."""

from __future__ import annotations

import logging
import random
from collections import deque
from pathlib import Path

import pytest
import torch
from torch import nn

from nova.gpu.offload import LayerStreamer, find_layer_stack, stream_vision_layers
from nova.models.loader import load_model

NUM_VISION_LAYERS = 5
IMAGE_TOKEN_ID = 300


def _save_llava(path: Path, vision: str) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_VISION_LAYERS,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    vcfg = (
        CLIPVisionConfig(**kw, projection_dim=32) if vision == "clip" else SiglipVisionConfig(**kw)
    )
    strategy = "default" if vision == "clip" else "full"
    cfg = LlavaConfig(
        text_config=text,
        vision_config=vcfg,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2 if vision == "clip" else -1,
    )
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    return {v: _save_llava(root / v, v) for v in ("clip", "siglip")}


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- an instrumented fake stream
# ---------------------------------------------------------------------
class _Event:
    def __init__(self, kind: str, label):
        self.kind, self.label, self.done, self.upto = kind, label, False, 0


class LazyStreamOps:
    """Copy stream and compute stream as queues that run later, in a random interleaving.

    Copies write their data only when the fake runs them; a compute is *issued* when the layer's
    forward runs (it reads its slot then) and *completes* later. Violations are collected."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.queue: deque = deque()  # ("wait", event) | ("copy", slot, layer, dst, src, done)
        self.pending: deque = deque()  # (compute id, slot) issued, not complete
        self.num_issued = self.num_completed = 0
        self.compute_events: list[_Event] = []
        self.latest_copy: dict[int, _Event] = {}
        self.slot_layer: dict[int, int | None] = {}
        self.waited: set[int] = set()
        self.log: list[tuple] = []
        self.violations: list[str] = []

    # StreamOps --------------------------------------------------------------------------------
    def copy(self, slot, layer, dst, src, after):
        done = _Event("copy", (slot, layer))
        if after is not None:
            self.queue.append(("wait", after))
        self.queue.append(("copy", slot, layer, dst, src, done))
        self.latest_copy[slot] = done
        self.log.append(("copy_enqueued", slot, layer))
        self._advance_randomly()
        return done

    def wait(self, event):
        self.log.append(("wait", event.label))
        while not event.done:
            if not self.queue:
                self.violations.append(f"waited on {event.label}, which nothing will complete")
                return
            self._run_head(forced=True)
        self.waited.add(id(event))

    def record(self):
        ev = _Event("compute", self.num_issued)
        ev.upto = self.num_issued
        ev.done = self.num_completed >= ev.upto
        self.compute_events.append(ev)
        self.log.append(("record", self.num_issued))
        self._advance_randomly()
        return ev

    def synchronize(self):
        self._complete_computes(self.num_issued)
        while self.queue:
            self._run_head(forced=True)

    # the compute side (called from the instrumented layer forward) -------------------------------
    def issue_compute(self, slot: int, layer: int) -> None:
        ev = self.latest_copy.get(slot)
        if self.slot_layer.get(slot) != layer or ev is None or not ev.done:
            self.violations.append(
                f"computed layer {layer} before its copy into slot {slot} completed"
            )
        elif id(ev) not in self.waited:
            self.violations.append(f"computed layer {layer} without waiting for its copy event")
        self.num_issued += 1
        self.pending.append((self.num_issued, slot))
        self.log.append(("compute", slot, layer))

    # the fake device ------------------------------------------------------------------------------
    def _complete_computes(self, upto: int) -> None:
        while self.pending and self.pending[0][0] <= upto:
            self.pending.popleft()
            self.num_completed += 1
        for ev in self.compute_events:
            if not ev.done and ev.upto <= self.num_completed:
                ev.done = True

    def _run_head(self, forced: bool) -> bool:
        op = self.queue[0]
        if op[0] == "wait":
            ev = op[1]
            if not ev.done:
                if not forced:
                    return False
                self._complete_computes(ev.upto)  # computes issued before it do not depend on it
            self.queue.popleft()
            return True
        _, slot, layer, dst, src, done = op
        if any(s == slot for _, s in self.pending):
            self.violations.append(f"copy of layer {layer} overwrote slot {slot} while in use")
        self.log.append(("copy_start", slot, layer))
        for d, s in zip(dst, src):
            d.copy_(s)
        self.slot_layer[slot] = layer
        done.done = True
        self.queue.popleft()
        self.log.append(("copy_done", slot, layer))
        return True

    def _advance_randomly(self) -> None:
        if self.pending and self.rng.random() < 0.5:
            self._complete_computes(self.pending[0][0] + self.rng.randrange(len(self.pending)))
        for _ in range(self.rng.randrange(3)):
            if not self.queue or not self._run_head(forced=False):
                break


def _instrument(streamer: LayerStreamer, ops: LazyStreamOps) -> None:
    """Tell the fake when each layer computes and which slot its parameters point into."""
    for i, layer in enumerate(streamer.layers):
        orig = layer.forward

        def forward(*args, _i=i, _orig=orig, _layer=layer, **kwargs):
            ptr = next(_layer.parameters()).data_ptr()
            slots = [s[0].data_ptr() for s in streamer.slots]
            if ptr not in slots:
                ops.violations.append(f"layer {_i} computed on weights outside the slots")
                slot = -1
            else:
                slot = slots.index(ptr)
            ops.issue_compute(slot, _i)
            return _orig(*args, **kwargs)

        layer.forward = forward


def _stream_with_fake(loaded, k: int, seed: int, cls=LayerStreamer):
    ops = LazyStreamOps(seed)
    streamer = cls(loaded.model.vision.streamable_layers(), k, torch.device("cpu"), ops)
    _instrument(streamer, ops)
    return streamer, ops


BATCHES = ((2, 11), (1, 12), (3, 13), (2, 11))


def _reference(loaded) -> list[torch.Tensor]:
    return [loaded.model.encode_images(_pixels(n, s)) for n, s in BATCHES]


# -- outputs
# -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_offload_gives_identical_outputs(llava_dirs, vision, k):
    loaded = load_model(llava_dirs[vision])
    ref = _reference(loaded)
    streamer = stream_vision_layers(loaded.model.vision, k, torch.device("cpu"))
    assert streamer is not None and streamer.stats.num_slots == k
    for (n, s), expected in zip(BATCHES, ref):  # several batches: the schedule runs across them
        assert torch.equal(loaded.model.encode_images(_pixels(n, s)), expected)


def test_k_at_least_the_layer_count_keeps_the_encoder_resident(llava_dirs, caplog):
    loaded = load_model(llava_dirs["clip"])
    with caplog.at_level(logging.WARNING, logger="nova.gpu.offload"):
        assert (
            stream_vision_layers(loaded.model.vision, NUM_VISION_LAYERS, torch.device("cpu"))
            is None
        )
    assert "stays resident" in caplog.text
    with pytest.raises(ValueError, match="nothing to stream"):
        LayerStreamer(
            loaded.model.vision.streamable_layers(), NUM_VISION_LAYERS, torch.device("cpu")
        )


def test_remove_puts_the_layers_back(llava_dirs):
    loaded = load_model(llava_dirs["clip"])
    ref = _reference(loaded)
    streamer = stream_vision_layers(loaded.model.vision, 2, torch.device("cpu"))
    loaded.model.encode_images(_pixels(1, 5))  # stop mid-cycle
    streamer.remove()
    assert [
        torch.equal(loaded.model.encode_images(_pixels(n, s)), r) for (n, s), r in zip(BATCHES, ref)
    ] == [True] * len(BATCHES)


# -- the schedule, with the instrumented fake stream
# -------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_schedule_invariants_under_random_interleavings(llava_dirs, k, seed):
    loaded = load_model(llava_dirs["clip"])
    ref = _reference(loaded)
    _streamer, ops = _stream_with_fake(loaded, k, seed)
    for (n, s), expected in zip(BATCHES, ref):
        assert torch.equal(loaded.model.encode_images(_pixels(n, s)), expected)
    assert ops.violations == []
    computes = [e for e in ops.log if e[0] == "compute"]
    assert [layer for _, _, layer in computes] == list(range(NUM_VISION_LAYERS)) * len(BATCHES)
    assert [slot for _, slot, _ in computes] == [i % k for i in range(len(computes))]
    if k >= 2:  # prefetch: step s+1's copy is enqueued before step s computes (overlap)
        enq = [i for i, e in enumerate(ops.log) if e[0] == "copy_enqueued"]
        comp = [i for i, e in enumerate(ops.log) if e[0] == "compute"]
        assert all(enq[s + 1] < comp[s] for s in range(len(comp)))


def test_schedule_check_catches_a_missing_wait(llava_dirs):
    class NoWait(LayerStreamer):
        def _wait_for_copy(self, slot):
            pass

    loaded = load_model(llava_dirs["clip"])
    _, ops = _stream_with_fake(loaded, 2, 0, NoWait)
    for n, s in BATCHES:
        loaded.model.encode_images(_pixels(n, s))
    assert any("before its copy" in v or "without waiting" in v for v in ops.violations)


def test_schedule_check_catches_overwriting_a_slot_in_use(llava_dirs):
    class NoComputeEvent(LayerStreamer):
        def _load(self, step, after):
            super()._load(step, None)  # the copy does not wait for the slot's last compute

    loaded = load_model(llava_dirs["clip"])
    _, ops = _stream_with_fake(loaded, 2, 1, NoComputeEvent)
    for n, s in BATCHES:
        loaded.model.encode_images(_pixels(n, s))
    assert any("while in use" in v for v in ops.violations)


def test_out_of_order_layers_restart_the_schedule(llava_dirs):
    loaded = load_model(llava_dirs["clip"])
    ref = _reference(loaded)
    streamer, ops = _stream_with_fake(loaded, 2, 3)
    layers = streamer.layers
    with torch.inference_mode():  # an aborted forward: only the first two layers run
        x = torch.randn(1, 17, 32)
        layers[0](x, None)
        layers[1](x, None)
    for (n, s), expected in zip(BATCHES, ref):
        assert torch.equal(loaded.model.encode_images(_pixels(n, s)), expected)
    assert ops.violations == []


# -- generic layer stacks
# ------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class _Tower(nn.Module):  # Qwen2-VL-shaped: patch embed, ``blocks``, merger
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(_Block() for _ in range(6))
        self.merger = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 4)])

    def forward(self, x):
        x = self.patch_embed(x)
        for b in self.blocks:
            x = b(x)
        return self.merger[1](self.merger[0](x))


def test_streams_any_stack_of_identical_blocks():
    torch.manual_seed(0)
    tower = _Tower()
    assert find_layer_stack(tower) is tower.blocks
    x = torch.randn(3, 4)
    ref = tower(x)
    streamer = stream_vision_layers(tower, 2, torch.device("cpu"))
    assert streamer.stats.saved_bytes == 4 * streamer.stats.layer_bytes
    assert torch.equal(tower(x), ref) and torch.equal(tower(x), ref)


# -- the runner: memory freed goes to the KV cache, and the engine's answers do not change
# -----------
def test_runner_gives_the_freed_memory_to_the_kv_cache(llava_dirs, monkeypatch):
    from nova.runtime import runner as R

    monkeypatch.setattr(R, "DEFAULT_CPU_KV_CACHE_BYTES", 1 << 20)
    base = R.ModelRunner(load_model(llava_dirs["clip"]), R.CacheConfig(block_size=16))
    off = R.ModelRunner(
        load_model(llava_dirs["clip"]), R.CacheConfig(block_size=16), vision_offload_layers=2
    )
    st = off.vision_streamer.stats
    assert st.saved_bytes == (NUM_VISION_LAYERS - 2) * st.layer_bytes > 0
    per_block = base.kv_cache.num_bytes // base.kv_cache.num_blocks
    assert off.block_manager.num_blocks == ((1 << 20) + st.saved_bytes) // per_block
    assert off.block_manager.num_blocks > base.block_manager.num_blocks
    assert off.memory.weights_streamed_bytes == st.streamed_bytes
    assert off.memory.offload_saved_bytes == st.saved_bytes
    assert off.memory.weights_resident_bytes == base.memory.weights_resident_bytes - st.saved_bytes
    pinned = R.ModelRunner(
        load_model(llava_dirs["clip"]), R.CacheConfig(num_blocks=7), vision_offload_layers=2
    )
    assert pinned.block_manager.num_blocks == 7  # an explicit size stays as given


def test_engine_answers_are_identical_with_offload(llava_dirs):
    from nova.config import EngineConfig
    from nova.engine.llm_engine import LLMEngine
    from nova.models.inputs import PromptInput
    from nova.sampling_params import SamplingParams

    outputs = {}
    for k in (0, 2):
        nova = LLMEngine(
            EngineConfig(model=str(llava_dirs["clip"]), num_kv_blocks=64, vision_offload_layers=k)
        )
        n_img = nova.processor.num_image_tokens
        prompts = [
            PromptInput(
                [1] + [IMAGE_TOKEN_ID] * n_img + [5 + i, 7], _pixels(1, 20 + i), num_images=1
            )
            for i in range(3)
        ]
        reqs = nova.run_all(prompts, SamplingParams(max_tokens=6, temperature=0.0))
        assert all(r.error is None for r in reqs)
        outputs[k] = [r.output_token_ids for r in reqs]
    assert outputs[2] == outputs[0]


# -- GPU
# -------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("k", [1, 2])
def test_gpu_offload_identical_and_frees_device_memory(llava_dirs, k):
    loaded = load_model(llava_dirs["clip"], device=torch.device("cuda"))
    ref = [loaded.model.encode_images(_pixels(n, s).cuda()) for n, s in BATCHES]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    streamer = stream_vision_layers(loaded.model.vision, k, torch.device("cuda"))
    after = torch.cuda.memory_allocated()
    assert before - after >= streamer.stats.saved_bytes * 0.9
    assert all(t.is_pinned() for layer in streamer.host for t in layer)
    for (n, s), expected in zip(BATCHES, ref):
        assert torch.equal(loaded.model.encode_images(_pixels(n, s).cuda()), expected)
