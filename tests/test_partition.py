"""SM-partition backends: planning in whole SMs, API detection, selection and fallback, and the
green-context backend's create-once / switch-at-batch-boundaries logic (CPU, with a fake
green-context API), plus GPU-marked tests of real green contexts."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import types

import pytest
import torch

from nova.core.nova_policy import NovaPolicy
from nova.cost.gpus import GPUS
from nova.gpu import partition as P
from nova.gpu.backend import CpuBackend, PartitionUnavailable
from nova.gpu.green_api import detect_green_api
from nova.gpu.green_context import GreenContextBackend
from nova.gpu.partition import make_backend
from nova.gpu.sm_plan import SMGrid, plan_partition
from nova.gpu.streams import TorchCuda
from nova.types import STAGES, Partition, Stage

HOPPER = SMGrid(132, 8, 8)
AMPERE = SMGrid(84, 2, 4)
GRIDS = (HOPPER, AMPERE, SMGrid(108, 2, 4), SMGrid(16, 1, 1))


# -- planning --------------------------------------------------------------------------------------
def _co_running_sms(plan) -> int:
    return sum(n for _, n in plan.groups)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.num_sms}sm")
def test_plans_never_overbook_and_stay_on_the_grid(grid):
    rng = random.Random(grid.num_sms)
    for _ in range(500):
        shares = [rng.choice((1.0, rng.uniform(0.01, 0.99))) for _ in STAGES]
        if sum(s for s in shares if s < 1.0) > 1.0 and rng.random() < 0.5:
            shares[1] = shares[0]  # the nova shape: vision and prefill share one partition
        try:
            plan = plan_partition(Partition(*shares), grid)
        except ValueError as exc:  # only when the minimum partitions cannot fit at all
            assert "does not fit" in str(exc)
            continue
        assert _co_running_sms(plan) <= grid.num_sms
        for stage, share in zip(STAGES, shares):
            n = plan.stage_sms(stage)
            if share >= 1.0:
                assert n is None
            else:
                on_grid = n % grid.granularity == 0 or (n - grid.min_sms) % grid.granularity == 0
                assert n >= grid.min_sms and on_grid, (stage, n)


def test_the_hopper_overbooking_case_is_planned_within_the_device():
    part = Partition(vision=0.5, prefill=0.357, decode=0.143)
    naive = sum(-(-part.share(s) * 132 // 8) * 8 for s in STAGES)
    assert naive > 132  # rounding each share up overbooks (the bug this plan avoids)
    # the cost model's view rounds to the nearest step instead (nova.cost.sm_grid)
    assert sum(GPUS["h100-sxm"].granted_sms(part.share(s)) for s in STAGES) <= 132
    plan = plan_partition(part, HOPPER)
    assert _co_running_sms(plan) <= 132
    assert all(plan.stage_sms(s) % 8 == 0 for s in STAGES)


def test_nova_partitions_merge_vision_and_prefill_and_keep_decode_on_grid():
    from nova.cost.base import make_cost_model

    policy = NovaPolicy(
        cost_model=make_cost_model("roofline", "h100-sxm", "cogagent-9b"),
        sm_granularity_share=HOPPER.share_step,
    )
    parts = policy.partition_set()
    assert len(parts) == len(set(parts)) > 5
    for part in parts:
        plan = plan_partition(part, HOPPER)
        assert _co_running_sms(plan) <= 132
        if 0.0 < part.decode < 0.99 and part.prefill < 0.99:
            assert ((Stage.VISION, Stage.PREFILL), plan.stage_sms(Stage.PREFILL)) in plan.groups
            # decode's share is a whole number of grid steps: it gets exactly that
            assert plan.stage_sms(Stage.DECODE) == round(part.decode * 132)


def test_shared_partition_is_unlimited():
    plan = plan_partition(Partition.shared(), HOPPER)
    assert plan.is_unlimited and plan.groups == ()


def test_planning_imports_without_torch():
    """The scheduler and the simulator may plan SMs: nova.gpu.sm_plan needs no torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from nova.gpu.sm_plan import SMGrid, plan_partition\n"
        "from nova.types import Partition, Stage\n"
        "plan = plan_partition(Partition(0.75, 0.75, 0.25), SMGrid(132, 8, 8))\n"
        "print(plan.stage_sms(Stage.DECODE), plan.stage_sms(Stage.PREFILL))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["32", "96"]


def test_minimum_partitions_that_cannot_fit_are_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        plan_partition(Partition(0.1, 0.1, 0.1), SMGrid(16, 8, 8))


# -- API detection
# -----------------------------------------------------------------------------------
class _Ctx210:
    @staticmethod
    def create(num_sms, device_id=0):
        return object()

    def set_context(self):
        pass

    def pop_context(self):
        pass


class _Ctx213(_Ctx210):
    def Stream(self):
        pass


def test_detect_green_api_by_feature():
    m210 = types.SimpleNamespace(GreenContext=_Ctx210, SUPPORTED=True)
    m213 = types.SimpleNamespace(GreenContext=_Ctx213, SUPPORTED=True)
    m215 = types.SimpleNamespace(GreenContext=_Ctx213, SMPartition=types.SimpleNamespace(split=1))
    assert detect_green_api(m210, "2.10.0", "12.8").kind == "context-stack"
    assert detect_green_api(m213, "2.13.0", "12.9").kind == "stream"
    assert detect_green_api(m215, "2.15.0", "13.0").kind == "sm-partition"


def test_detect_green_api_explains_what_is_missing():
    with pytest.raises(PartitionUnavailable, match=r"PyTorch >= 2\.10.*torch 2\.9\.1"):
        detect_green_api(None, "2.9.1", "12.8")
    with pytest.raises(PartitionUnavailable, match="without green-context support"):
        detect_green_api(
            types.SimpleNamespace(GreenContext=_Ctx213, SUPPORTED=False), "2.13.0", "12.6"
        )
    with pytest.raises(PartitionUnavailable, match="CUDA build"):
        detect_green_api(types.SimpleNamespace(GreenContext=_Ctx213), "2.13.0+cpu", None)
    with pytest.raises(PartitionUnavailable, match="neither Stream"):
        detect_green_api(types.SimpleNamespace(GreenContext=object), "2.11.0", "12.8")


def test_installed_torch_is_detected_honestly():
    try:
        import torch.cuda.green_contexts as gc
    except ImportError:
        gc = None
    if torch.version.cuda is None:
        with pytest.raises(PartitionUnavailable):
            detect_green_api(gc, torch.__version__, torch.version.cuda)
    else:
        try:
            api = detect_green_api(gc, torch.__version__, torch.version.cuda)
        except PartitionUnavailable as exc:
            assert "green" in str(exc)
        else:
            assert api.kind in ("context-stack", "stream", "sm-partition")


# -- selection
# ---------------------------------------------------------------------------------------
def test_selection_on_cpu():
    assert make_backend("auto", "cpu").name == "cpu"
    assert make_backend("cpu", "cpu").name == "cpu"
    assert make_backend("none", "cpu").name == "cpu"  # no streams on a CPU
    with pytest.raises(PartitionUnavailable, match="needs a CUDA device"):
        make_backend("green_context", "cpu")
    with pytest.raises(PartitionUnavailable, match="unknown partition backend"):
        make_backend("mps_masks", "cpu")


def test_cpu_backend_reports_cores_and_limits_them():
    backend = CpuBackend(cores=range(6))
    applied = []
    backend._apply = applied.append  # record instead of pinning the test's thread
    part = Partition(0.5, 0.5, 0.5, isolated=True)
    assert backend.enforces_limits and backend.grid.num_sms == 6
    assert backend.granted_sms(Stage.DECODE, part) == 3
    with backend.activate(Stage.DECODE, part) as stream:
        assert stream is None
    assert applied == [(3, 4, 5)] and backend.granted_sms(Stage.DECODE, part) == 3
    assert backend.share_granted_sms(0.5) == 3 and backend.share_granted_sms(1.0) == 6


def test_engine_rejects_an_explicit_green_context_request_on_cpu(tiny_dirs):
    from nova.config import EngineConfig
    from nova.engine.llm_engine import LLMEngine

    with pytest.raises(PartitionUnavailable, match="CUDA device"):
        LLMEngine(
            EngineConfig(model=str(tiny_dirs["llama"]), partition="green_context", num_kv_blocks=8)
        )


def test_auto_falls_back_with_a_logged_reason(monkeypatch, caplog):
    """On CUDA without green contexts, ``auto`` becomes ``none`` and says why (simulated)."""

    def no_green(index, cuda, grid):
        raise PartitionUnavailable("simulated: this PyTorch has no green contexts")

    monkeypatch.setattr(P, "green_backend", no_green)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: types.SimpleNamespace(multi_processor_count=132, major=9),
    )
    monkeypatch.setattr(TorchCuda, "new_stream", lambda self: object())
    with caplog.at_level(logging.WARNING, logger="nova.gpu.partition"):
        backend = make_backend("auto", "cuda")
    assert backend.name == "none" and backend.grid == HOPPER
    assert "simulated: this PyTorch has no green contexts" in caplog.text
    with pytest.raises(PartitionUnavailable, match="simulated"):
        make_backend("green_context", "cuda")
    with pytest.raises(PartitionUnavailable, match="for CPU devices"):
        make_backend("cpu", "cuda")


# -- the green-context backend over a fake API ----------------------------------------------------
class FakeCuda:
    """Stands in for torch.cuda: records which stream is current."""

    def __init__(self):
        self.current = "default"
        self.log = []

    def new_stream(self):
        return f"plain-{len(self.log)}-{id(object())}"

    def stream_guard(self, stream):
        cuda = self

        class Guard:
            def __enter__(self):
                self.prev, cuda.current = cuda.current, stream
                cuda.log.append(("enter", stream))

            def __exit__(self, *exc):
                cuda.current = self.prev
                cuda.log.append(("exit", stream))

        return Guard()

    def current_stream(self):
        return self.current


class FakeGreenModule:
    """Stands in for ``torch.cuda.green_contexts`` of one API shape (``kind``): records the
    contexts it creates (``created``, each with ``requested`` SMs and its ``part``), the disjoint
    splits (``splits``) and the context made current by ``set_context`` (``stack_top``)."""

    def __init__(self, kind, cuda, grant=None, readback=True, split_fails=False):
        self.kind, self.cuda, self.grant, self.readback = kind, cuda, grant, readback
        self.created, self.splits, self.stack_top, self.split_fails = [], [], None, split_fails
        module = self

        class GreenContext:
            def __init__(self, sm_partition):  # the sm-partition shape's constructor
                module._made(self, sm_partition.sm_count, sm_partition)

            @classmethod
            def create(cls, num_sms, device_id=0):
                ctx = cls.__new__(cls)
                module._made(ctx, num_sms, None)
                return ctx

            def set_context(self):
                assert module.stack_top is None, "set_context twice"
                module.stack_top = self
                module.cuda.current = f"ctxdefault-{id(self)}"

            def pop_context(self):
                assert module.stack_top is self
                module.stack_top = None
                module.cuda.current = "default"

        if kind != "context-stack":
            GreenContext.Stream = lambda self: f"green-{id(self)}"
        self.GreenContext = GreenContext
        if kind == "sm-partition":
            device = types.SimpleNamespace(split=self._split)
            self.SMPartition = types.SimpleNamespace(split=1, from_device=lambda index: device)

    def _made(self, ctx, num_sms, part):
        ctx.requested, ctx.part = num_sms, part
        ctx.granted = self.grant(num_sms) if self.grant else num_sms
        if self.readback:
            ctx.sm_count = ctx.granted
        self.created.append(ctx)

    def _split(self, num_sms):
        if self.split_fails:
            raise RuntimeError("CUDA driver 12.8 < 13.1")
        self.splits.append(tuple(num_sms))
        parts = [types.SimpleNamespace(sm_count=n, index=i) for i, n in enumerate(num_sms)]
        return parts, types.SimpleNamespace(sm_count=132 - sum(num_sms))


def _green(kind, probe=None, **kw):
    cuda = FakeCuda()
    module = FakeGreenModule(kind, cuda, **kw)
    api = detect_green_api(module, "fake", "12.8")
    assert api.kind == kind
    return GreenContextBackend(HOPPER, api, 0, cuda, probe=probe), module, cuda


NOVA_A = Partition(vision=104 / 132, prefill=104 / 132, decode=24 / 132, name="nova")
NOVA_B = Partition(vision=96 / 132, prefill=96 / 132, decode=32 / 132, name="nova")


@pytest.mark.parametrize("kind", ["stream", "sm-partition"])
def test_green_contexts_are_created_once_and_switched_per_batch(kind):
    backend, api, cuda = _green(kind)
    seen = {}
    for i in range(20):  # batches alternate between two partitions
        part = NOVA_A if i % 2 == 0 else NOVA_B
        for stage in STAGES:
            with backend.activate(stage, part) as stream:
                assert cuda.current == stream  # the stage's work runs on that stream
                seen.setdefault((part, stage), stream)
                assert seen[(part, stage)] == stream  # the same context every time
            assert cuda.current == "default"
    assert len(api.created) == 6  # 2 partitions x 3 stages, never re-created
    assert backend.granted_sms(Stage.DECODE, NOVA_A) == 24
    assert backend.granted_sms(Stage.PREFILL, NOVA_B) == 96
    streams = {seen[(NOVA_A, s)] for s in STAGES}
    assert len(streams) == 3  # each stage its own context (a context is current to one thread)
    if kind == "sm-partition":
        assert sorted(api.splits) == sorted([(104, 24), (96, 32)])  # one split per partition
        by_stage = {c.part.index for c in api.created if c.requested == 104}
        assert by_stage == {0}  # vision and prefill on the same (disjoint from decode) SMs


def test_context_stack_api_pairs_set_and_pop_even_when_the_batch_fails():
    backend, api, cuda = _green("context-stack")
    with backend.activate(Stage.DECODE, NOVA_A) as stream:
        assert api.stack_top is not None and stream == cuda.current
    assert api.stack_top is None
    with pytest.raises(RuntimeError, match="boom"), backend.activate(Stage.PREFILL, NOVA_A):
        raise RuntimeError("boom")
    assert api.stack_top is None and cuda.current == "default"


def test_unlimited_stages_use_plain_streams_without_green_contexts():
    backend, api, _cuda = _green("stream")
    decode_only = Partition(vision=1.0, prefill=1.0, decode=1.0)
    with backend.activate(Stage.VISION, decode_only) as stream:
        assert stream.startswith("plain")
    assert api.created == [] and backend.granted_sms(Stage.VISION, decode_only) == 132


def test_prepare_creates_the_policy_set_up_front():
    backend, api, _ = _green("stream")
    from nova.cost.base import make_cost_model

    policy = NovaPolicy(
        cost_model=make_cost_model("roofline", "h100-sxm", "cogagent-9b"),
        sm_granularity_share=HOPPER.share_step,
    )
    backend.prepare(policy.partition_set())
    n = len(api.created)
    assert n >= 2 * len(policy.partition_set()) - 2
    for part in policy.partition_set():
        for stage in STAGES:
            with backend.activate(stage, part):
                pass
    assert len(api.created) == n  # nothing created while serving


def test_granted_sms_are_read_back_and_shortfalls_reported(caplog):
    backend, _api, _ = _green("stream", grant=lambda n: n - 8)  # the driver grants fewer
    with (
        caplog.at_level(logging.WARNING, logger="nova.gpu.green_context"),
        backend.activate(Stage.DECODE, NOVA_A),
    ):
        pass
    assert backend.granted_sms(Stage.DECODE, NOVA_A) == 16
    info = {i.stage: i for i in backend.created()}["decode"]
    assert (info.requested_sms, info.granted_sms, info.granted_source) == (24, 16, "driver")
    assert "asked for 24 SMs, the driver granted 16" in caplog.text


def test_granted_sms_from_the_driver_probe_when_the_api_cannot_tell():
    probe = types.SimpleNamespace(granted=lambda n: n + 2)
    backend, _api, _ = _green("stream", readback=False, probe=probe)
    with backend.activate(Stage.DECODE, NOVA_A):
        pass
    info = {i.stage: i for i in backend.created()}["decode"]
    assert (info.granted_sms, info.granted_source) == (26, "driver-probe")
    backend2, _, _ = _green("stream", readback=False)
    with backend2.activate(Stage.DECODE, NOVA_A):
        pass
    assert {i.stage: i for i in backend2.created()}["decode"].granted_source == "planned"


def test_failed_disjoint_split_falls_back_to_independent_contexts(caplog):
    backend, api, _ = _green("sm-partition", split_fails=True)
    with (
        caplog.at_level(logging.WARNING, logger="nova.gpu.green_context"),
        backend.activate(Stage.DECODE, NOVA_A),
    ):
        pass
    assert "may share SMs" in caplog.text and "may overlap" in backend.describe()
    assert all(c.part is None for c in api.created)


def test_share_context_for_the_profiler():
    backend, api, cuda = _green("stream")
    with backend.share_context(0.25) as stream:
        assert cuda.current == stream
    assert api.created[-1].requested == HOPPER.sms_for_share(0.25) == 32
    with backend.share_context(0.25):
        pass
    assert len(api.created) == 1
    with backend.share_context(1.0):
        assert cuda.current == "default"


def test_executor_switches_partition_at_batch_boundaries(tiny_dirs, monkeypatch):
    """The engine's executor activates each batch's partition for its stage (CPU, recorded)."""
    from nova.config import EngineConfig
    from nova.engine import llm_engine
    from nova.models.inputs import PromptInput

    class Recording(CpuBackend):
        def __init__(self):
            super().__init__(num_cores=4)
            self.activations = []
            self._apply = lambda cores: None  # 4 planned cores, whatever this machine has

        def run(self, stage, partition, fn):
            self.activations.append((stage, partition))
            return super().run(stage, partition, fn)

    backend = Recording()
    monkeypatch.setattr(llm_engine, "make_backend", lambda name, device, *_: backend)
    nova = llm_engine.LLMEngine(
        EngineConfig(model=str(tiny_dirs["llama"]), policy="static_partition", num_kv_blocks=32)
    )
    prompts = [PromptInput([1, 5, 6, 7]), PromptInput([1, 9, 10])]
    from nova.sampling_params import SamplingParams

    reqs = nova.run_all(prompts, SamplingParams(max_tokens=3))
    assert all(len(r.output_token_ids) == 3 for r in reqs)
    stages = {s for s, _ in backend.activations}
    assert {Stage.PREFILL, Stage.DECODE} <= stages
    assert all(p.name == "static" for _, p in backend.activations)
    # static_partition's decode share 0.2 of 4 cores: one core of its own
    assert nova.executor.granted_sms[Stage.DECODE] == 1


# -- real green contexts (GPU) -------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_gpu_auto_selects_a_working_backend():
    backend = make_backend("auto", "cuda")
    assert backend.name in ("green_context", "none")
    props = torch.cuda.get_device_properties(0)
    assert backend.grid.num_sms == props.multi_processor_count


@pytest.mark.gpu
@gpu
def test_gpu_green_context_partitions_run_and_report_granted_sms():
    try:
        backend = make_backend("green_context", "cuda")
    except PartitionUnavailable as exc:
        pytest.fail(f"green contexts unavailable on this GPU: {exc}")
    n = backend.grid.num_sms
    part = Partition(vision=0.75, prefill=0.75, decode=0.25)
    plan = backend.plan(part)
    assert _co_running_sms(plan) <= n
    a = torch.randn(2048, 2048, device="cuda")
    for stage in STAGES:
        with backend.activate(stage, part) as stream:
            c = a @ a
            stream.synchronize()
        assert torch.allclose(c, a @ a, rtol=1e-3, atol=1e-2)
    granted = {i.stage: i.granted_sms for i in backend.created()}
    assert granted["decode"] + granted["prefill"] <= n or backend.api.kind != "sm-partition"
    assert all(g >= backend.grid.min_sms for g in granted.values())


@pytest.mark.gpu
@gpu
def test_gpu_small_partition_is_slower_on_compute_bound_work():
    try:
        backend = make_backend("green_context", "cuda")
    except PartitionUnavailable as exc:
        pytest.fail(f"green contexts unavailable on this GPU: {exc}")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def timed(ctx):
        with ctx:
            s = torch.cuda.current_stream()
            for _ in range(2):
                a @ a
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(s)
            for _ in range(5):
                a @ a
            end.record(s)
            end.synchronize()
            return start.elapsed_time(end)

    full = timed(backend.share_context(1.0))
    small = timed(backend.share_context(backend.grid.min_sms / backend.grid.num_sms))
    assert small > 2.0 * full, (small, full)
