"""nexlify.probe: the controller's torch questions, asked of a child process once (each child imports torch,
seconds): the device count reuses any answer already given."""

from __future__ import annotations

import pytest

from nexlify import probe as probe_module


@pytest.fixture
def asked(monkeypatch) -> list[str]:
    """The names the child was asked about; its answers say 2 CUDA devices, or torch_error for "broken"."""
    names: list[str] = []

    def child(name: str) -> dict:
        names.append(name)
        if name == "broken":
            return {"torch_error": "torch cannot be imported: ImportError: no"}
        return {"torch": "2.13.0, 2 threads", "cuda_devices": 2, "device": name}

    monkeypatch.setattr(probe_module, "_answers", {})
    monkeypatch.setattr(probe_module, "_ask_child", child)
    return names


@pytest.mark.parametrize(("earlier", "children"), [
    ([], ["auto"]),  # nothing asked yet: one child, for "auto"
    (["cpu"], ["cpu"]),  # preflight asked for the device: its answer carries the count
    (["cpu", "cuda"], ["cpu", "cuda"]),
    (["broken"], ["broken", "auto"]),  # an answer without the count does not stand in
])
def test_cuda_devices_reuses_an_earlier_answer(asked, earlier, children) -> None:
    for name in earlier:
        probe_module.probe(name)
    assert probe_module.cuda_devices() == 2
    assert asked == children


def test_a_name_is_asked_once(asked) -> None:
    first = probe_module.probe("cpu")
    assert probe_module.probe("cpu") is first
    assert asked == ["cpu"]


def test_the_real_child_answers(monkeypatch) -> None:
    """One real child (imports torch): the CPU build on this machine sees no CUDA device."""
    monkeypatch.setattr(probe_module, "_answers", {})
    found = probe_module.probe("cpu")
    assert found["device"] == "cpu"
    assert found["torch"].startswith("2.")
    assert probe_module.cuda_devices() == found["cuda_devices"]
