"""Layer-by-layer residency of memory-mapped weights in the torch stage (issue 6, big models).

Figures on the ~3 GB synthetic LLaMA come from ``python -m benchmarks.big_model --steps compress``; these
tests pin the mechanism on a saved tiny LLaMA: pages leave the process, contents never change, weights
written in place are never dropped, and the passes compute exactly what they computed before.
"""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
import torch
from qsvd_export.compress.calibrate import collect_input_stats, for_each_gradient
from qsvd_export.compress.memory import LayerResidency, decoder_layers, layer_by_layer
from qsvd_export.models.projections import attention_projections
from qsvd_export.zoo import load_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page residency is Linux-only")


def _resident_pages(tensor: torch.Tensor) -> int:
    """Pages of ``tensor``'s storage mapped into this process right now (/proc/self/pagemap present bit)."""
    page = mmap.PAGESIZE
    storage = tensor.untyped_storage()
    start = storage.data_ptr() // page
    end = -(-(storage.data_ptr() + storage.nbytes()) // page)
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(start * 8)
        flags = np.frombuffer(pagemap.read((end - start) * 8), dtype=np.uint64)
    return int(((flags >> np.uint64(63)) & np.uint64(1)).sum())


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    load_model("tiny-llama").model.save_pretrained(folder, safe_serialization=True)
    return folder


def _file_backed(folder):  # type: ignore[no-untyped-def]
    loaded = load_model(str(folder))
    blocks = attention_projections(loaded.model)
    return loaded.model, blocks


def test_the_layer_stack_is_found():
    model = load_model("tiny-llama").model
    blocks = attention_projections(model)
    assert decoder_layers(model, [b.parent for b in blocks]) == list(model.model.layers)


def test_released_pages_leave_the_process_and_come_back_unchanged(saved_llama):
    model, blocks = _file_backed(saved_llama)
    layers = decoder_layers(model, [b.parent for b in blocks])
    weight = layers[0].mlp.down_proj.weight
    before = weight.detach().clone()  # reads every page
    assert _resident_pages(weight) > 0
    residency = LayerResidency([list(layer.parameters()) for layer in layers])
    assert residency.enabled
    residency.release(0)
    assert _resident_pages(weight) == 0
    assert torch.equal(weight.detach(), before)


def test_a_weight_written_in_place_is_never_dropped(saved_llama):
    model, blocks = _file_backed(saved_llama)
    layers = decoder_layers(model, [b.parent for b in blocks])
    weight = layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight.add_(1.0)  # copy-on-write: these pages are anonymous now
    expected = weight.detach().clone()
    LayerResidency([list(layers[0].parameters())]).release(0)
    assert torch.equal(weight.detach(), expected)


def test_weights_in_anonymous_memory_are_left_alone():
    model = load_model("tiny-llama").model  # built in memory, nothing mapped from a file
    blocks = attention_projections(model)
    with layer_by_layer(model, [b.parent for b in blocks]) as residency:
        assert not residency.enabled


def test_passes_compute_the_same_with_pages_dropped_between_layers(saved_llama):
    mapped_model, mapped_blocks = _file_backed(saved_llama)
    memory_model = load_model("tiny-llama").model
    memory_blocks = attention_projections(memory_model)
    windows = np.random.default_rng(0).integers(0, 250, size=(2, 24))
    batches = [{"input_ids": torch.from_numpy(w[None, :]), "attention_mask": torch.ones(1, 24, dtype=torch.int64)}
               for w in windows]
    stats = [collect_input_stats(m, b, batches) for m, b in ((mapped_model, mapped_blocks), (memory_model, memory_blocks))]
    for mapped, memory in zip(*stats):
        assert torch.equal(mapped.xtx, memory.xtx) and torch.equal(mapped.abs_sum, memory.abs_sum)

    mapped_weight = mapped_blocks[1].weights()[0]
    resident_after_backward: list[int] = []

    def gradients(model, blocks):  # type: ignore[no-untyped-def]
        grads: list[list[torch.Tensor]] = []

        def collect(i, g, o):  # type: ignore[no-untyped-def]
            grads.append([t.clone() for block in g for t in block])
            resident_after_backward.append(_resident_pages(mapped_weight))

        for_each_gradient(model, blocks, windows, collect)
        return grads

    for mapped, memory in zip(gradients(mapped_model, mapped_blocks), gradients(memory_model, memory_blocks)):
        for a, b in zip(mapped, memory):
            assert torch.equal(a, b)
    assert resident_after_backward[:2] == [0, 0]  # layer 1 left during the backward, before the window ended
    assert _resident_pages(mapped_weight) == 0
