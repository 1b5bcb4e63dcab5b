"""The model core: personalization blocks, training, adapters, restore — Python API."""

from __future__ import annotations

import pytest
import torch

from pfstorer.adapter import Adapter
from pfstorer.errors import AdapterError, AdapterMismatchError, ReferenceCountError
from pfstorer.images import load_image
from pfstorer.model import load_base
from pfstorer.personalization import AdapterSlots
from pfstorer.sampling import restore, restore_batch
from pfstorer.training import PersonalizeConfig, PersonalizeJob, personalize, personalize_many

FAST = dict(steps=2, color_fix="none")


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


@pytest.fixture(scope="module")
def people(lfw_bench) -> dict[str, list[torch.Tensor]]:
    """Four bench people: their first 5 photos (the references) as tensors."""
    names = list(lfw_bench)[:4]
    return {n: [load_image(p) for p in lfw_bench[n][:5]] for n in names}


@pytest.fixture(scope="module")
def trained(tiny, people) -> Adapter:
    name = next(iter(people))
    return personalize(tiny, people[name], identity=name, config=PersonalizeConfig(steps=12, seed=3))


def test_fresh_adapter_reproduces_base_bit_for_bit(tiny, people):
    name, refs = next(iter(people.items()))
    fresh = personalize(tiny, refs, identity=name, config=PersonalizeConfig(steps=0))
    assert all(float(v.abs().max()) == 0 for k, v in fresh.tensors.items() if k.endswith("alpha"))
    base = restore(tiny, refs[0], seed=5, **FAST)
    with_adapter = restore(tiny, refs[0], adapter=fresh, seed=5, **FAST)
    assert torch.equal(base, with_adapter)


def test_training_moves_alpha_and_changes_output(tiny, people, trained):
    refs = next(iter(people.values()))
    assert trained.metadata.steps == 12
    assert len(trained.metadata.loss_curve) == 12
    assert max(float(v.abs().max()) for k, v in trained.tensors.items() if k.endswith("alpha")) > 0
    base = restore(tiny, refs[0], seed=5, **FAST)
    assert not torch.equal(base, restore(tiny, refs[0], adapter=trained, seed=5, **FAST))


def test_strength_scales_the_adapter_from_the_base_to_the_adapter(tiny, people, trained):
    from pfstorer.errors import InputError

    img = next(iter(people.values()))[0]
    base = restore(tiny, img, seed=5, **FAST)
    full = restore(tiny, img, adapter=trained, seed=5, **FAST)
    assert torch.equal(restore(tiny, img, adapter=trained, seed=5, strength=0.0, **FAST), base)  # bit for bit
    assert torch.equal(restore(tiny, img, adapter=trained, seed=5, strength=1.0, **FAST), full)
    half = restore(tiny, img, adapter=trained, seed=5, strength=0.5, **FAST)
    assert not torch.equal(half, base) and not torch.equal(half, full)
    with pytest.raises(InputError, match="strength"):
        restore(tiny, img, adapter=trained, strength=1.5, **FAST)


def test_adapter_needs_no_reference_photos_and_roundtrips(tiny, people, trained, tmp_path):
    """Everything inference needs is in the artifact: save -> load -> same output bit for bit."""
    refs = next(iter(people.values()))
    trained.save(tmp_path / "a")
    loaded = Adapter.load(tmp_path / "a")
    assert loaded.metadata.tensors_sha256 == trained.metadata.tensors_sha256
    assert {k for k in loaded.tensors if k.endswith("ref_k")}, "cached reference keys are stored"
    a = restore(tiny, refs[1], adapter=trained, seed=9, **FAST)
    b = restore(tiny, refs[1], adapter=loaded, seed=9, **FAST)
    assert torch.equal(a, b)


def test_tampered_adapter_is_refused(trained, tmp_path):
    d = trained.save(tmp_path / "a")
    data = bytearray((d / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256"):
        Adapter.load(d)


def test_adapter_on_another_base_names_both_fingerprints(trained):
    other = load_base("tiny-latent")
    with pytest.raises(AdapterMismatchError) as err:
        trained.check_base(other)
    assert trained.metadata.base_fingerprint in str(err.value) and other.fingerprint in str(err.value)


def test_fingerprint_depends_on_weights():
    a, b = load_base("tiny"), load_base("tiny")
    assert a.fingerprint == b.fingerprint
    with torch.no_grad():
        b.unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    b.invalidate_fingerprint()
    assert a.fingerprint != b.fingerprint


def test_sampling_defaults_are_not_part_of_the_fingerprint(tmp_path):
    from pfstorer.model import RestorationModel
    from pfstorer.presets import SamplingDefaults

    model = load_base("tiny")
    other = RestorationModel(model.config.model_copy(update={"sampling": SamplingDefaults(steps=3, t_start=300)}))
    other.load_state_dict(model.state_dict())
    assert other.fingerprint == model.fingerprint  # adapters of one stay valid on the other
    other.save(tmp_path / "ckpt")
    assert load_base("tiny", weights=str(tmp_path / "ckpt")).fingerprint == model.fingerprint


def test_base_saved_in_float16_loads_with_the_fingerprint_of_its_header(tmp_path):
    from safetensors import safe_open

    model = load_base("tiny")
    full, half = model.save(tmp_path / "fp32"), model.save(tmp_path / "fp16", dtype=torch.float16)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    loaded = load_base(str(half))
    with safe_open(str(half / "model.safetensors"), "pt") as fh:
        assert fh.metadata()["fingerprint"] == loaded.fingerprint  # of the rounded weights, as loaded
    assert loaded.dtype == torch.float32 and loaded.fingerprint != model.fingerprint
    assert load_base(str(full)).fingerprint == model.fingerprint


def test_a_planner_reads_the_fingerprint_from_the_header_without_the_weights(tmp_path):
    """What `pfstorer run`'s driver does: the header names the base; a header written for
    another config (or none) is not trusted, the weights are hashed instead."""
    from safetensors.torch import load_file, save_file

    from pfstorer.model import base_fingerprint

    model = load_base("tiny")
    ckpt = model.save(tmp_path / "ckpt")
    assert base_fingerprint(str(ckpt)) == (model.config, model.fingerprint)
    assert base_fingerprint("tiny", weights=str(ckpt))[1] == model.fingerprint
    tensors = load_file(ckpt / "model.safetensors")
    save_file(tensors, ckpt / "model.safetensors", metadata={"fingerprint": "f" * 32})
    assert base_fingerprint(str(ckpt))[1] == "f" * 32  # read from the header, not computed
    save_file(tensors, ckpt / "model.safetensors")  # no fingerprint in the header
    assert base_fingerprint(str(ckpt))[1] == model.fingerprint
    assert base_fingerprint("compact")[1] == load_base("compact").fingerprint  # saved with another adapter config


def test_training_is_seeded(tiny, people):
    name, refs = next(iter(people.items()))
    cfg = PersonalizeConfig(steps=2, seed=11)
    a = personalize(tiny, refs, identity=name, config=cfg)
    b = personalize(tiny, refs, identity=name, config=cfg)
    c = personalize(tiny, refs, identity=name, config=PersonalizeConfig(steps=2, seed=12))
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_reference_count_limits(tiny, people):
    refs = next(iter(people.values()))
    with pytest.raises(ReferenceCountError, match="at least 3"):
        personalize(tiny, refs[:2], identity="x", config=PersonalizeConfig(steps=0))
    with pytest.raises(ReferenceCountError, match="at most 4"):
        personalize(tiny, refs, identity="x", config=PersonalizeConfig(steps=0, max_refs=4))


def test_restore_is_deterministic_per_seed_for_both_samplers(tiny, people):
    img = next(iter(people.values()))[0]
    for sampler in ("ddim", "ddpm"):
        a = restore(tiny, img, seed=1, sampler=sampler, **FAST)
        assert torch.equal(a, restore(tiny, img, seed=1, sampler=sampler, **FAST))
        assert not torch.equal(a, restore(tiny, img, seed=2, sampler=sampler, **FAST))


def test_scale_upsamples_then_restores(tiny, people):
    img = next(iter(people.values()))[0][:, :100, :90]
    out = restore(tiny, img, scale=1.5, **FAST)
    assert out.shape == (3, 150, 135)
    assert 0 <= float(out.min()) and float(out.max()) <= 1


def test_latent_preset_personalizes_and_restores(people):
    model = load_base("tiny-latent")
    name, refs = next(iter(people.items()))
    fresh = personalize(model, refs[:3], identity=name, config=PersonalizeConfig(steps=0))
    base = restore(model, refs[0], seed=4, **FAST)
    assert base.shape == refs[0].shape
    assert torch.equal(base, restore(model, refs[0], adapter=fresh, seed=4, **FAST))
    trained = personalize(model, refs[:3], identity=name, config=PersonalizeConfig(steps=2))
    assert not torch.equal(base, restore(model, refs[0], adapter=trained, seed=4, **FAST))


@pytest.mark.parametrize("gen_rows", [None, 2])
def test_packed_training_equals_solo_training(tiny, people, gen_rows):
    """K identities packed in one batch get the adapters they would get alone, also when L_gen
    takes fewer rows than L_diff (each identity's rows sit at their own offsets)."""
    cfg = PersonalizeConfig(steps=3, seed=0, batch_size=4, gen_rows=gen_rows)
    jobs = [PersonalizeJob(n, refs[:4], seed=i + 1) for i, (n, refs) in enumerate(list(people.items())[:3])]
    packed = personalize_many(tiny, jobs, config=cfg, capacity=3)
    for job, adapter in zip(jobs, packed, strict=True):
        solo = personalize(tiny, job.references, identity=job.identity,
                           config=cfg.model_copy(update={"seed": job.seed}))
        for key, value in solo.tensors.items():
            rel = (adapter.tensors[key] - value).norm() / value.norm().clamp_min(1e-12)
            assert rel < 1e-4, (job.identity, key, float(rel))


def test_gen_rows_sets_the_rows_of_l_gen(tiny, people, monkeypatch):
    """Each identity's step runs batch_size L_diff rows and gen_rows L_gen rows (null LQ), so
    gen_rows cuts the cost of a step; a gen_rows above batch_size is batch_size."""
    from pfstorer.training import PackedTrainer

    seen: list[tuple[int, int]] = []
    denoise = tiny.denoise

    def counting(x, t, lq, pb=None):
        null = tiny.null_lq(lq[:1])
        seen.append((x.shape[0], sum(bool(torch.equal(row, null[0])) for row in lq)))
        return denoise(x, t, lq, pb)

    monkeypatch.setattr(tiny, "denoise", counting)
    jobs = [PersonalizeJob(n, refs[:4], seed=i) for i, (n, refs) in enumerate(list(people.items())[:2])]
    for gen_rows, rows, null in ((1, 2 * (4 + 1), 2), (9, 2 * (4 + 4), 8)):
        seen.clear()
        list(PackedTrainer(tiny, PersonalizeConfig(steps=1, batch_size=4, gen_rows=gen_rows, p_hq=0.0),
                           capacity=2).run(jobs))
        assert (rows, null) in seen, seen  # beside the reference rows' calls


def test_prefetched_draws_give_the_same_adapters(tiny, people):
    """Batches drawn ahead in a background thread are the batches drawn in the step: same adapters
    bit for bit, and the draws really happened off the training thread."""
    from pfstorer.config import TrainingSpeed
    from pfstorer.training import PackedTrainer

    cfg = PersonalizeConfig(steps=4, seed=0)
    jobs = [PersonalizeJob(n, refs[:4], seed=i) for i, (n, refs) in enumerate(list(people.items())[:3])]
    out = {}
    for prefetch in (False, True):
        trainer = PackedTrainer(tiny, cfg, capacity=2, speed=TrainingSpeed(prefetch="on" if prefetch else "off"))
        out[prefetch] = {a.identity: a for a in trainer.run(jobs)}
        stats = trainer.data_stats
        assert stats["steps"] == 8 and stats["draw_s"] > 0  # 3 people, 2 slots, 4 steps each
        assert stats["ahead"] == (3 * 3 if prefetch else 0)  # each person's draws after the first
    for name, adapter in out[False].items():
        for key, value in adapter.tensors.items():
            assert torch.equal(out[True][name].tensors[key], value), (name, key)


@pytest.mark.parametrize("prefetch", ["off", "on"])
def test_a_slot_resumed_from_its_snapshot_ends_as_if_never_stopped(tiny, people, prefetch):
    """A slot's state taken mid-training and put into a fresh trainer (another worker) continues
    bit for bit: same adapter tensors, same loss curve, steps counted once."""
    from pfstorer.config import TrainingSpeed
    from pfstorer.training import PackedTrainer

    cfg = PersonalizeConfig(steps=4, seed=0)
    speed = TrainingSpeed(prefetch=prefetch)
    name, refs = next(iter(people.items()))
    job = PersonalizeJob(name, refs[:4], seed=7)
    (whole,) = PackedTrainer(tiny, cfg, speed=speed).run([job])

    first = PackedTrainer(tiny, cfg, speed=speed)
    k = first.add(job)
    first.step()
    first.step()
    state = first.snapshot(k)
    first.step()  # the lost worker went on a little: none of this may leak into the resume
    assert state.step == 2 and len(state.curve) == 2
    second = PackedTrainer(tiny, cfg, speed=speed)
    second.add(job, resume=state)
    (resumed,) = [a for _ in range(3) for a in second.step()]
    assert resumed.metadata.steps == 4 and resumed.metadata.loss_curve == whole.metadata.loss_curve
    for key, value in whole.tensors.items():
        assert torch.equal(resumed.tensors[key], value), key


def test_a_slot_state_of_another_base_is_refused(tiny, people):
    from pfstorer.training import PackedTrainer

    name, refs = next(iter(people.items()))
    trainer = PackedTrainer(tiny, PersonalizeConfig(steps=2))
    state = trainer.snapshot(trainer.add(PersonalizeJob(name, refs[:3])))
    state.params = state.params[:-1]
    with pytest.raises(ValueError, match="another base"):
        PackedTrainer(tiny, PersonalizeConfig(steps=2)).add(PersonalizeJob(name, refs[:3]), resume=state)


def test_packed_slots_refill_as_people_finish(tiny, people):
    """More jobs than slots: every job is trained and emitted exactly once, in finishing order."""
    cfg = PersonalizeConfig(steps=1)
    jobs = [PersonalizeJob(n, refs[:3], seed=i) for i, (n, refs) in enumerate(people.items())]
    out = personalize_many(tiny, jobs, config=cfg, capacity=2)
    assert [a.identity for a in out] == [j.identity for j in jobs]
    assert all(a.metadata.steps == 1 for a in out)


def test_mixed_identity_batch_equals_restoring_alone(tiny, people):
    """One batch mixing people gives each the output it gets alone."""
    names = list(people)[:3]
    adapters = [personalize(tiny, people[n][:3], identity=n, config=PersonalizeConfig(steps=2, seed=i))
                for i, n in enumerate(names)]
    slots = AdapterSlots.for_model(tiny, slots=3)
    for i, a in enumerate(adapters):
        slots.load(i, a.tensors)
    imgs = torch.stack([people[n][4] for n in names])
    batch = restore_batch(tiny, imgs, adapters=slots, slots=[2, 0, 1], seeds=[7, 8, 9], **FAST)
    for row, (slot, seed) in enumerate([(2, 7), (0, 8), (1, 9)]):
        alone = restore(tiny, imgs[row], adapter=adapters[slot], seed=seed, **FAST)
        # batched kernels round differently in the last bits; far below one 8-bit level (3.9e-3)
        torch.testing.assert_close(batch[row], alone, rtol=0, atol=1e-4)


def test_adapter_swap_is_in_place(tiny, people, trained):
    slots = AdapterSlots.for_model(tiny, slots=2)
    before = {n: b.data_ptr() for n, b in slots.named_buffers()}
    slots.load(1, trained.tensors)
    assert {n: b.data_ptr() for n, b in slots.named_buffers()} == before
    bad = dict(trained.tensors)
    bad["blocks.0.ref_k"] = bad["blocks.0.ref_k"][:-1]
    with pytest.raises(AdapterError, match="shape"):
        slots.load(0, bad)


def test_resnet_levels_add_personalization_blocks_that_start_as_the_identity(tiny, people):
    from pfstorer.model import RestorationModel

    shape = tiny.config.adapter.model_copy(update={"resnet_levels": (0,)})
    m = RestorationModel(tiny.config.model_copy(update={"adapter": shape}))
    m.load_state_dict(tiny.state_dict())
    m.freeze()
    extra = len(m.pb_blocks) - len(m.transformer_blocks)
    assert extra == len(m.unet.up_blocks[-1].resnets) > 0  # the finest decoder level's ResNets
    assert m.fingerprint != tiny.fingerprint  # adapters of one layout never load on the other
    name, refs = next(iter(people.items()))
    photo = refs[0]
    fresh = personalize(m, refs, identity=name, config=PersonalizeConfig(steps=0))
    assert torch.equal(restore(m, photo, adapter=fresh, **FAST), restore(m, photo, **FAST))
    trained = personalize(m, refs, identity=name, config=PersonalizeConfig(steps=3, lr=0.05, alpha_lr=0.05))
    n = len(m.pb_blocks)
    assert all(float(trained.tensors[f"blocks.{i}.alpha"].abs().max()) > 0 for i in range(n))
    assert not torch.equal(restore(m, photo, adapter=trained, **FAST), restore(m, photo, **FAST))
