"""Issue 8 fast serving path on CPU: the compiled denoiser never recompiles on adapter swaps."""

from __future__ import annotations

import pytest
import torch

from pfstorer.images import load_image
from pfstorer.model import load_base
from pfstorer.personalization import AdapterSlots
from pfstorer.sampling import restore_batch
from pfstorer.training import PersonalizeConfig, personalize


@pytest.fixture(scope="module")
def adapters(lfw_bench):
    model = load_base("tiny")
    names = list(lfw_bench)[:3]
    return [personalize(model, [load_image(p) for p in lfw_bench[n][:3]], identity=n,
                        config=PersonalizeConfig(steps=1, seed=i)) for i, n in enumerate(names)]


def test_swapping_adapters_on_compiled_denoiser_never_recompiles(adapters, lfw_bench, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = load_base("tiny")
    compiled = load_base("tiny").compile_denoiser(backend="eager")  # dynamo guards are what matter here
    slots_e, slots_c = AdapterSlots.for_model(eager, 2), AdapterSlots.for_model(compiled, 2)
    img = load_image(lfw_bench[next(iter(lfw_bench))][5])[:, 40:88, 40:88].unsqueeze(0).expand(2, -1, -1, -1)
    kw = dict(steps=2, color_fix="none", seeds=[1, 2])
    outputs = []
    for round_, (a, b) in enumerate([(0, 1), (2, 0), (1, 2)]):
        for slots in (slots_e, slots_c):
            slots.load(0, adapters[a].tensors)
            slots.load(1, adapters[b].tensors)
        ours = restore_batch(compiled, img, adapters=slots_c, slots=[0, 1], **kw)
        ref = restore_batch(eager, img, adapters=slots_e, slots=[0, 1], **kw)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
        outputs.append(ours)
        if round_ == 0:  # graphs for the tile-batch shapes exist now; nothing may compile again
            graphs = counters["stats"]["unique_graphs"]
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.equal(outputs[0], outputs[1]), "the swap really changed the identities"
