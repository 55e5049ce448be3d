"""Our engine on the demo model: greedy equals transformers.generate, text-only and with an
image; ``nova demo`` and ``nova generate`` end to end through the CLI."""

from __future__ import annotations

import pytest
import torch

from nova.cli import main
from nova.llm import LLM
from nova.sampling_params import SamplingParams
from nova.screenshots import make_screenshot

pytestmark = pytest.mark.slow
MAX_NEW = 24


@pytest.fixture(scope="module")
def demo():
    return LLM("demo", policy="sequential", block_size=16, num_kv_blocks=128)


@pytest.fixture(scope="module")
def hf_demo():
    from transformers import LlavaForConditionalGeneration

    from nova.models.demo import build_demo_model

    return LlavaForConditionalGeneration.from_pretrained(
        build_demo_model(), dtype=torch.float32
    ).eval()


def _hf_greedy(hf, prompt) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    kw = {"pixel_values": prompt.pixel_values} if prompt.pixel_values is not None else {}
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            **kw,
        )
    return out[0, ids.shape[1] :].tolist()


def test_demo_greedy_matches_transformers_text_and_image(demo, hf_demo):
    proc = demo.processor
    text = proc.from_chat([{"role": "user", "content": "What is the capital of France?"}])
    image = proc.from_chat(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Tap the OK button."}],
            }
        ],
        [make_screenshot(3)],
    )
    assert image.token_ids.count(proc.loaded.model.image_token_id) == 196
    results = demo.generate([text, image], SamplingParams(max_tokens=MAX_NEW))
    assert results[0].output_token_ids == _hf_greedy(hf_demo, text)
    assert results[1].output_token_ids == _hf_greedy(hf_demo, image)
    assert "Paris" in proc.decode(results[0].output_token_ids)


@pytest.mark.parametrize("policy", ["multi_stream", "sequential"])
def test_nova_demo_command(capsys, policy):
    assert main(["demo", "--max-tokens", "16", "--agent-steps", "3", "--policy", policy]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out
    assert out.count("answer:") == 5  # 3 agent steps + 2 text questions
    assert "Paris" in out
    assert "Per-request timeline" in out and f"Latency ({policy})" in out
    for row in ("TTFT", "TPOT", "E2E", "vision queue", "prefill queue"):
        assert row in out
    assert "finished 5, aborted 0, failed 0" in out


def test_nova_generate_command_and_errors(capsys, tmp_path):
    shot = tmp_path / "shot.png"
    make_screenshot(1).save(shot)
    assert main(["generate", "--prompt", "What is 2+2?", "--max-tokens", "8"]) == 0
    assert (
        main(["generate", "--prompt", "Describe it.", "--image", str(shot), "--max-tokens", "4"])
        == 0
    )
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    assert main(["generate", "--prompt", "x", "--image", str(bad)]) == 2
    assert "could not be decoded as an image" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_via_server_and_bench_client(capsys):
    from nova.demo import demo_via_server

    outcome = demo_via_server(num_prompts=3, request_rate=5.0, max_tokens=6)
    assert outcome.summary.num_completed == 3
    out = capsys.readouterr().out
    assert "3 sent, 3 completed, 0 failed" in out and "TTFT" in out
