"""One registry behaviour for every named table: duplicates raise, unknown names list choices."""

from __future__ import annotations

import pytest

from nova.registry import DuplicateNameError, Registry


def test_registry_adds_looks_up_and_lists_sorted():
    reg: Registry[int] = Registry("thing")
    assert reg.add("b", 2) == 2

    @reg.register("a")
    def one() -> int:
        return 1

    assert reg.lookup("b") == 2 and reg["a"] is one
    assert reg.names() == ["a", "b"] and sorted(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg and reg.get("c") is None
    assert dict(reg.items()) == {"a": one, "b": 2}


def test_registry_refuses_a_duplicate_and_keeps_the_first():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(DuplicateNameError, match="thing 'a' is already registered"):
        reg.add("a", 2)
    assert reg.lookup("a") == 1
    with pytest.raises(ValueError, match="non-empty string"):
        reg.add("", 3)


def test_registry_unknown_name_names_the_choices_with_its_error_type():
    class UnknownThing(ValueError):
        pass

    reg: Registry[int] = Registry("thing", UnknownThing)
    reg.add("b", 2)
    reg.add("a", 1)
    with pytest.raises(UnknownThing, match=r"^unknown thing 'z'; choose one of a, b$"):
        reg.lookup("z")
    with pytest.raises(UnknownThing):
        reg.lookup(["unhashable"])
    with pytest.raises(KeyError):
        reg["z"]  # plain mapping access stays a KeyError


def _duplicates():
    """Registering an existing name again, for each of Nova's registries."""
    from nova.core.baselines import SequentialPolicy
    from nova.core.policy import register_policy
    from nova.cost.base import register_cost_model
    from nova.cost.gpus import get_gpu, register_gpu
    from nova.cost.roofline import RooflineCostModel
    from nova.sim.eval import EXPERIMENTS, register_experiment
    from nova.workload import poisson, register_workload

    return {
        "policy": lambda: register_policy("sequential")(SequentialPolicy),
        "cost model": lambda: register_cost_model("roofline")(RooflineCostModel),
        "GPU": lambda: register_gpu(get_gpu("a6000")),
        "workload": lambda: register_workload("poisson")(poisson),
        "experiment": lambda: register_experiment(EXPERIMENTS["quick-a6000"]),
    }


@pytest.mark.parametrize("kind", ["policy", "cost model", "GPU", "workload", "experiment"])
def test_every_torch_free_registry_refuses_duplicates(kind):
    with pytest.raises(DuplicateNameError, match="already registered"):
        _duplicates()[kind]()


def test_architecture_registry_refuses_duplicates():
    from nova.models.registry import ARCHITECTURES, register

    arch = ARCHITECTURES["LlamaForCausalLM"]
    with pytest.raises(DuplicateNameError, match="architecture 'LlamaForCausalLM'"):
        register(arch.name, arch.text_config)((arch.build, arch.map_name))
    assert ARCHITECTURES["LlamaForCausalLM"] is arch


def test_lookups_keep_their_functions_and_messages():
    from nova.core.policy import make_policy
    from nova.cost.base import UnknownCostModelError, make_cost_model
    from nova.cost.gpus import UnknownGpuError, get_gpu
    from nova.sim.eval import run_experiment
    from nova.workload import make_workload

    assert get_gpu(" A6000 ").name == "a6000"  # case-insensitive, as before
    with pytest.raises(UnknownGpuError, match=r"unknown GPU 'B200'; choose one of .*a6000"):
        get_gpu("B200")
    with pytest.raises(UnknownCostModelError, match=r"unknown cost model kind 'x'; choose one of"):
        make_cost_model("x", "a6000", "cogagent-9b")
    with pytest.raises(ValueError, match=r"unknown policy 'x'; choose one of .*nova"):
        make_policy("x")
    with pytest.raises(ValueError, match=r"unknown workload 'x'; choose one of .*poisson"):
        make_workload("x")
    with pytest.raises(ValueError, match=r"unknown experiment 'x'; choose one of .*paper-a6000"):
        run_experiment("x", None, progress=lambda _: None)
